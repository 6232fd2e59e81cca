"""The lmms-eval model `twigbench`: the harness's engine with one method and decoding choice.

    lmms-eval --model twigbench --model_args pretrained=DIR,method=fastv,budget=64,K=2 --tasks mme

`model_args` are an experiment cell's (harness.lmms.args), validated with the same one-line errors.
Batch 1, greedy (or SSD, which gives the same tokens as greedy decoding of its target). Every
generation request is measured as a native cell measures a sample (harness.cell.CellRunner: warm-up,
repeats, the paired baseline as the cell's timing section says) into `self.records`.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from harness.cell import CellRunner
from harness.engine.generate import decode_step, prefill, sync
from harness.lmms.args import cell_from_args
from harness.models.adapter import load_model
from harness.records import SampleRecord

SHAPES_TASK = "shapes_"  # the embedded benchmark's tasks (harness.lmms.tasks): docs carry the sample uid


def _sample(task: str, doc: dict, doc_id: int):
    """What a method may read of the sample (its uid seeds the random control; the embedded
    benchmark's own sample, with its objects, for the oracle)."""
    if task.startswith(SHAPES_TASK) and "uid" in doc:
        from harness.data.synthetic import make_sample

        split, _, index = doc["uid"].rpartition("-")
        return make_sample(split, int(index), doc.get("qtype"))
    return SimpleNamespace(uid=f"{task}-{doc_id}")


def cut(text: str, until) -> str:
    """The text up to the first of the stop strings."""
    stops = [until] if isinstance(until, str) else list(until or [])
    ends = [text.find(s) for s in stops if s and s in text]
    return text[:min(ends)] if ends else text


class TwigbenchLMM(lmms):
    is_simple = True

    def __init__(self, batch_size=1, device=None, max_batch_size=None, adapter=None, cell=None, **model_args):
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError(f"batch_size={batch_size!r}; allowed: 1 (the harness measures batch 1)")
        self.cell = cell or cell_from_args(model_args)  # a sweep passes its cell and its loaded model
        m = self.cell.model
        self.adapter = adapter or load_model(m["path"], m["dtype"], m["attn_implementation"],
                                             checkpoint=m.get("checkpoint"))
        self.runner = CellRunner(self.adapter, self.cell)
        self.method = self.runner.method
        self.warmup_left = self.cell.timing["warmup"]
        self.records: list[SampleRecord] = []  # one per generate_until request, as a native cell's
        self.scoring: list[dict] = []  # one per loglikelihood request
        self.max_new_used: set[int] = set()  # the tasks' max_new_tokens (they override the cell's)

    def _inputs(self, task: str, split: str, doc_id: int, doc_to_visual, ctx: str):
        doc = self.task_dict[task][split][doc_id]
        visuals = [v for v in (doc_to_visual(doc) if doc_to_visual else []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(f"{task} doc {doc_id} has {len(visuals)} images; allowed: exactly one (LLaVA-1.5 "
                             "prompts hold one image)")
        return doc, self.adapter.inputs(visuals[0].convert("RGB"), ctx)

    def _request(self, req):
        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        doc, x = self._inputs(task, split, doc_id, doc_to_visual, ctx)
        if gen_kwargs.get("do_sample"):  # a temperature without sampling changes nothing under greedy
            raise ValueError(f"{task}: do_sample=True; allowed: greedy decoding only")
        max_new = int(gen_kwargs.get("max_new_tokens") or self.runner.max_new_tokens)
        return ctx, gen_kwargs, doc_id, task, doc, x, max_new

    def generate_until(self, requests) -> list[GenerationResult]:
        """Each request as a native cell measures a sample: the first `timing.warmup` requests run
        untimed first, then every request is measured (repeats, the paired baseline, timing.subset
        as the cell's timing section says). Decoding runs to EOS or max_new_tokens (the task's);
        the answer returned is cut at the first `until` string."""
        for req in requests[:self.warmup_left]:
            ctx, _, doc_id, task, doc, x, max_new = self._request(req)
            self.runner.warm(_sample(task, doc, doc_id), x, max_new)
        self.warmup_left = 0
        if self.adapter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.adapter.device)
        out = []
        subset = self.cell.timing.get("subset")
        for req in requests:
            ctx, gen_kwargs, doc_id, task, doc, x, max_new = self._request(req)
            self.max_new_used.add(max_new)
            rec = self.runner.measure(_sample(task, doc, doc_id), x, max_new,
                                      timed=subset is None or len(self.records) < subset)
            rec.uid, rec.qtype, rec.question = f"{task}-{doc_id}", task, ctx
            rec.prediction = cut(rec.prediction, gen_kwargs.get("until"))
            self.records.append(rec)
            out.append(GenerationResult(rec.prediction, TokenCounts(input_tokens=int(x["input_ids"].shape[1]),
                                                                    output_tokens=rec.new_tokens)))
        return out

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """The continuation's negative log-likelihood after a prompt prefilled with the method's
        pruning (then the continuation teacher-forced through the pruned cache), and whether
        greedy decoding would produce it. lmms-eval 0.7 picks a multiple choice by the smallest
        value (its own models return the loss), and needs the pair wrapped in a GenerationResult."""
        out = []
        for req in requests:
            ctx, continuation, doc_to_visual, doc_id, task, split = req.args
            doc, x = self._inputs(task, split, doc_id, doc_to_visual, ctx)
            if callable(continuation):
                continuation = continuation(doc)
            ids = self._continuation_ids(x, ctx, str(continuation), visuals=doc_to_visual(doc))
            if not ids:
                raise ValueError(f"{task} doc {doc_id}: empty continuation {continuation!r}")
            sync(self.adapter.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                pre = prefill(self.adapter, x["input_ids"], x["pixel_values"], self.method, _sample(task, doc, doc_id))
                logits, nll, greedy, position = pre.logits, 0.0, True, pre.prompt_len
                for i, t in enumerate(ids):
                    logp = torch.log_softmax(logits.float(), -1)
                    nll -= float(logp[t])
                    greedy = greedy and int(logits.argmax()) == t
                    if i + 1 < len(ids):
                        logits = decode_step(self.adapter, t, position, pre.cache)
                        position += 1
            sync(self.adapter.device)
            self.scoring.append({"task": task, "doc_id": doc_id, "continuation": continuation, "nll": nll,
                                 "is_greedy": greedy, "e2e_ms": (time.perf_counter() - t0) * 1e3,
                                 "equal_token_average": sum(pre.visual_per_layer) / len(pre.visual_per_layer)})
            out.append(GenerationResult(text=(nll, greedy)))
        return out

    def _continuation_ids(self, x: dict, ctx: str, continuation: str, visuals) -> list[int]:
        """The continuation's tokens as they fall after the prompt (tokenized together, as the
        model would read them: a SentencePiece tokenizer merges the leading space differently
        on its own), falling back to the continuation alone if the prompt's tokens change."""
        a = self.adapter
        joint = a.processor(images=visuals[0].convert("RGB"), text=a.prompt(ctx) + continuation,
                            return_tensors="pt")["input_ids"][0].tolist()
        prompt = x["input_ids"][0].tolist()
        if joint[:len(prompt)] == prompt:
            return joint[len(prompt):]
        return a.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("twigbench answers single-round requests only (generate_until, loglikelihood); "
                                  "multi-round tasks are not supported")
