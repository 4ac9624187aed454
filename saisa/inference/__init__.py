"""Generation on a loaded model: prompts and batched answers (`generation`), the one sampler (`sampling`), the one
stop rule (`stopping`), the step decoder the server drives (`decoding`), and continuation scoring (`scoring`)."""
