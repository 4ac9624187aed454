"""The lmms-eval model class (imported by lmms-eval only): `generate_until` and `loglikelihood` over a saved saisa
model folder."""

from __future__ import annotations

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from saisa.evaluation.scoring import continuation_loglikelihood
from saisa.generation import answer_batch


def _visuals(doc_to_visual, doc) -> list:
    visuals = doc_to_visual(doc) if doc_to_visual is not None else []
    return [v for v in (visuals or []) if v is not None]


class SaisaLMM(lmms):
    def __init__(
        self, pretrained: str, batch_size: int | str = 8, device: str | None = None, dtype: str | None = None, **kwargs
    ) -> None:
        super().__init__()
        from saisa.loading import load_pretrained

        self.model, self.processor = load_pretrained(pretrained, device=device, dtype=dtype)
        self.batch_size_per_gpu = int(batch_size)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for start in tqdm(range(0, len(requests), self.batch_size_per_gpu), desc="saisa generate_until"):
            chunk = requests[start : start + self.batch_size_per_gpu]
            texts, images, gen_kwargs = [], [], chunk[0].args[1]
            for request in chunk:
                context, _, doc_to_visual, doc_id, task, split = request.args
                texts.append(context)
                images.append(_visuals(doc_to_visual, self.task_dict[task][split][doc_id]))
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            answers += [
                a.strip()
                for a in answer_batch(
                    self.model,
                    self.processor,
                    texts,
                    images,
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)),
                    stop=until,
                    temperature=float(gen_kwargs.get("temperature", 0.0)),
                )
            ]
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="saisa loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            scored = continuation_loglikelihood(
                self.model, self.processor, context, _visuals(doc_to_visual, doc), continuation
            )
            # lmms-eval 0.7.3 turns any plain tuple response into its str(); wrapped, the (logprob, is_greedy) pair
            # reaches the task's process_results intact.
            results.append(GenerationResult(text=scored))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("saisa: multi-round generation is not implemented for lmms-eval")
