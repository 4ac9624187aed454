"""A port of transformers' `GenerationTesterMixin` (tests/generation/test_utils.py, Apache-2.0, The HuggingFace Team):
that file is not in transformers' sdist on PyPI, so the tests that apply to a decoder-only VLM are restated here, under
their upstream names, with upstream's checks (output lengths, `generate`'s dict outputs and their shapes, decoding
strategies agreeing with each other, continuing from a returned cache, left padding, candidate-based decoding).

Where SAISA differs by design, the check states the SAISA fact instead of dropping it: an image is one placeholder id
in input_ids but `tokens_per_image` keys in the KV cache, so attention maps are `tokens_per_image` keys wider per image
than the prompt is long.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig


class GenerationTesterMixin:
    max_new_tokens = 3

    # -- helpers (upstream: _get_input_ids_and_config, _check_generate_outputs) ---------------------------------------
    def _inputs(self, batch_size: int = 2):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {key: value[:batch_size] for key, value in inputs.items()}  # one image per sample: rows align
        config.text_config.eos_token_id = None  # generate exactly max_new_tokens
        return config, inputs

    def _model(self, config, model_class=None):
        model_class = model_class or self.all_generative_model_classes[0]
        return model_class(copy.deepcopy(config)).eval()

    def _generate(self, model, inputs, **kwargs):
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": 1, **kwargs}
        with torch.no_grad():
            return model.generate(**inputs, **kwargs)

    def _visual_keys(self, inputs) -> int:
        """Keys the images add to each sequence's cache (the batch's visual block)."""
        images = (inputs["input_ids"] == self.model_tester.image_token_id).sum(1).max()
        return int(images) * self.model_tester.num_image_tokens

    def _check_generate_outputs(self, output, inputs, *, num_sequences: int | None = None, use_cache: bool = True):
        config, tester = self.model_tester, self.model_tester
        batch = num_sequences or inputs["input_ids"].shape[0]
        prompt = inputs["input_ids"].shape[1]
        new = output.sequences.shape[1] - prompt
        self.assertEqual(new, self.max_new_tokens)
        self.assertEqual(len(output.scores), new)
        self.assertEqual(len(output.logits), new)
        for scores in (*output.scores, *output.logits):
            self.assertEqual(scores.shape, (batch, config.vocab_size))
        visual = self._visual_keys(inputs)
        self.assertEqual(len(output.attentions), new)
        self.assertEqual(len(output.hidden_states), new)
        for step, (attentions, hidden_states) in enumerate(zip(output.attentions, output.hidden_states, strict=True)):
            queries = prompt if step == 0 or not use_cache else 1
            queries = prompt + step if not use_cache else queries
            keys = visual + prompt + step
            self.assertEqual(len(attentions), tester.num_hidden_layers)
            self.assertEqual(len(hidden_states), tester.num_hidden_layers + 1)
            for layer in attentions:
                self.assertEqual(layer.shape, (batch, tester.num_attention_heads, queries, keys))
            for layer in hidden_states:
                self.assertEqual(layer.shape, (batch, queries, tester.hidden_size))

    # -- tests ---------------------------------------------------------------------------------------------------------
    def test_greedy_generate(self):
        config, inputs = self._inputs()
        for model_class in self.all_generative_model_classes:
            output = self._generate(self._model(config, model_class), inputs)
            self.assertEqual(output.shape[1], inputs["input_ids"].shape[1] + self.max_new_tokens)

    def test_greedy_generate_dict_outputs(self):
        config, inputs = self._inputs()
        model = self._model(config)
        model.set_attn_implementation("eager")
        dict_kwargs = dict(
            output_scores=True,
            output_logits=True,
            output_attentions=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        output = self._generate(model, inputs, **dict_kwargs)
        self._check_generate_outputs(output, inputs)
        # the same sequences and scores without a cache (every step reads the whole sequence again)
        uncached = self._generate(model, inputs, use_cache=False, **dict_kwargs)
        self.assertTrue(torch.equal(uncached.sequences, output.sequences))
        self._check_generate_outputs(uncached, inputs, use_cache=False)
        for cached, again in zip(output.scores, uncached.scores, strict=True):
            torch.testing.assert_close(cached, again, atol=1e-5, rtol=1e-4)

    def test_sample_generate(self):
        config, inputs = self._inputs()
        model = self._model(config)
        torch.manual_seed(0)
        first = self._generate(model, inputs, do_sample=True, top_k=10, num_return_sequences=2)
        torch.manual_seed(0)
        again = self._generate(model, inputs, do_sample=True, top_k=10, num_return_sequences=2)
        self.assertEqual(first.shape, (2 * inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 3))
        self.assertTrue(torch.equal(first, again))

    def test_sample_generate_dict_output(self):
        config, inputs = self._inputs()
        model = self._model(config)
        model.set_attn_implementation("eager")
        output = self._generate(
            model,
            inputs,
            do_sample=True,
            num_return_sequences=2,
            output_scores=True,
            output_logits=True,
            output_attentions=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        self._check_generate_outputs(output, inputs, num_sequences=2 * inputs["input_ids"].shape[0])

    def test_beam_search_generate(self):
        config, inputs = self._inputs()
        model = self._model(config)
        output = self._generate(model, inputs, num_beams=2, num_return_sequences=2)
        self.assertEqual(output.shape, (2 * inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 3))
        # beam search with one beam is greedy search
        self.assertTrue(torch.equal(self._generate(model, inputs, num_beams=1), self._generate(model, inputs)))

    def test_beam_search_generate_dict_output(self):
        config, inputs = self._inputs()
        model = self._model(config)
        output = self._generate(
            model, inputs, num_beams=2, output_scores=True, output_logits=True, return_dict_in_generate=True
        )
        self.assertEqual(output.sequences.shape[1], inputs["input_ids"].shape[1] + self.max_new_tokens)
        self.assertEqual(len(output.scores), self.max_new_tokens)
        self.assertEqual(output.scores[0].shape, (2 * inputs["input_ids"].shape[0], self.model_tester.vocab_size))
        self.assertEqual(output.sequences_scores.shape, (inputs["input_ids"].shape[0],))
        self.assertEqual(output.beam_indices.shape[0], inputs["input_ids"].shape[0])

    def test_beam_sample_generate(self):
        config, inputs = self._inputs()
        model = self._model(config)
        torch.manual_seed(0)
        output = self._generate(model, inputs, num_beams=2, do_sample=True)
        self.assertEqual(output.shape, (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 3))

    def test_generate_continue_from_past_key_values(self):
        """Generating n tokens, then continuing from the returned cache, equals generating them at once."""
        config, inputs = self._inputs()
        model = self._model(config)
        whole = self._generate(model, inputs, max_new_tokens=4, return_dict_in_generate=True)
        first = self._generate(model, inputs, max_new_tokens=2, return_dict_in_generate=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        mask = torch.ones_like(first.sequences)
        follow = {**inputs, "input_ids": first.sequences, "attention_mask": mask}
        continued = self._generate(model, follow, max_new_tokens=2, return_dict_in_generate=True, past_key_values=cache)
        self.assertTrue(torch.equal(continued.sequences, whole.sequences))

    def test_left_padding_compatibility(self):
        """Left padding does not change the logits of the real tokens (upstream: next-token logits compared)."""
        config, inputs = self._inputs()
        model = self._model(config)
        with torch.no_grad():
            plain = model(**inputs).logits[:, -1]
            pad = torch.full((inputs["input_ids"].shape[0], 3), 1, dtype=torch.long)
            padded = {
                **inputs,
                "input_ids": torch.cat([pad, inputs["input_ids"]], 1),
                "attention_mask": torch.cat([torch.zeros_like(pad), inputs["attention_mask"]], 1),
            }
            torch.testing.assert_close(model(**padded).logits[:, -1], plain, atol=1e-5, rtol=1e-4)
        self.assertTrue(torch.equal(self._generate(model, padded)[:, 3:], self._generate(model, inputs)))

    def test_assisted_decoding_matches_greedy_search(self):
        config, inputs = self._inputs()
        model = self._model(config)
        model.set_attn_implementation("eager")
        kwargs = dict(output_scores=True, output_attentions=True, output_hidden_states=True)
        kwargs |= dict(return_dict_in_generate=True, max_new_tokens=4)
        greedy = self._generate(model, inputs, **kwargs)
        for batch in (1,):  # assisted decoding is batch size 1 in transformers
            one = {key: value[:batch] for key, value in inputs.items()}
            greedy_one = self._generate(model, one, **kwargs)
            assistant = self._model(config)
            assistant.load_state_dict(model.state_dict())
            assisted = self._generate(model, one, assistant_model=assistant, **kwargs)
            self.assertTrue(torch.equal(assisted.sequences, greedy_one.sequences))
            for a, b in zip(assisted.scores, greedy_one.scores, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        self.assertTrue(torch.equal(greedy.sequences[:1], greedy_one.sequences))

    def test_prompt_lookup_decoding_matches_greedy_search(self):
        config, inputs = self._inputs(batch_size=1)
        model = self._model(config)
        # a prompt that repeats itself, with the image in the repeated part: lookup copies around the placeholder
        ids = inputs["input_ids"]
        inputs = {**inputs, "input_ids": torch.cat([ids, ids[:, :4].masked_fill(ids[:, :4] == 3, 5)], 1)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        kwargs = dict(max_new_tokens=5, output_hidden_states=True, return_dict_in_generate=True)
        greedy = self._generate(model, inputs, **kwargs)
        lookup = self._generate(model, inputs, prompt_lookup_num_tokens=2, **kwargs)
        self.assertTrue(torch.equal(lookup.sequences, greedy.sequences))

    def test_generate_from_inputs_embeds(self):
        """Text-only embeddings generate what the same ids generate (images are placed by input_ids)."""
        config, inputs = self._inputs()
        model = self._model(config)
        ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == self.model_tester.image_token_id, 5)
        embeds = model.get_input_embeddings()(ids)
        with torch.no_grad():
            from_ids = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
            from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=1)
        self.assertTrue(torch.equal(from_embeds, from_ids[:, ids.shape[1] :]))

    def test_generation_config_defaults(self):
        config, _ = self._inputs()
        model = self._model(config)
        self.assertIsInstance(model.generation_config, GenerationConfig)
        self.assertTrue(model.can_generate())
