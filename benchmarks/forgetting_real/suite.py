"""Token-level evaluation sets and their scores (old capabilities and new tasks), on the frozen prefix.

Every set is one `model.Batch` whose prefix states are computed once with the base model; a score
is one forward pass of the tuned layers over it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import data as D
from .model import Batch, target_logits

OLD = ("text", "facts", "chat", "mc")
NEW = ("madeup", "rule")


def _qa(tok, pairs) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Prompt + answer sequences; the targets are the answer tokens."""
    seqs, targets = [], []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        targets.append([(len(p) - 1 + j, t) for j, t in enumerate(a)])
    return seqs, targets


def chat_prompt_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_dict=True)["input_ids"]


def chat_references(model, tok, n: int, cache: Path, max_new: int = 24) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the base model's greedy answer ids up to and with <|im_end|>), cached beside the model."""
    path = cache / "dowser_bench_chat_refs.json"
    if path.exists():
        refs = json.loads(path.read_text())
        if len(refs) >= n:
            return [tuple(r) for r in refs[:n]]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    refs = []
    with torch.no_grad():
        for text in D.INSTRUCTIONS[:n]:
            p = chat_prompt_ids(tok, text)
            out = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=end,
                                 pad_token_id=end)
            refs.append((p, out[0, len(p):].tolist()))
    path.write_text(json.dumps(refs))
    return refs


class Suite:
    """Every evaluation set, encoded through the frozen prefix of the base model."""

    def __init__(self, model, tok, cache: Path, frozen: int, quick: bool, log=print):
        self.frozen = frozen
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        n = dict(text=8 if quick else 16, text_len=48, chat=8 if quick else 16, mc=40 if quick else 90)
        self.sets: dict[str, Batch] = {}
        self.info: dict[str, object] = {}
        # text: next-token accuracy over 47 positions of 48-token windows of held-out English prose
        paras = D.english_text()
        step = max(1, len(paras) // n["text"])
        seqs = []
        for p in paras[::step]:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            if len(ids) >= n["text_len"]:
                seqs.append(ids[:n["text_len"]])
            if len(seqs) == n["text"]:
                break
        self.sets["text"] = Batch(seqs, [[(j, s[j + 1]) for j in range(len(s) - 1)] for s in seqs], self.pad)
        # facts: the cloze set, filtered below to what the base answers
        self._facts = D.FACTS
        self.sets["facts"] = Batch(*_qa(tok, [(p, " " + a) for p, a in D.FACTS]), self.pad)
        # chat: teacher-forced agreement with the base model's own greedy chat answers
        refs = chat_references(model, tok, n["chat"], cache)
        self.sets["chat"] = Batch([p + r for p, r in refs],
                                  [[(len(p) - 1 + j, t) for j, t in enumerate(r)] for p, r in refs], self.pad)
        # mc: one-token options scored after the item's prompt, calibrated by a content-free prompt (last row)
        items = D.mc_items()[: n["mc"]]
        self._mc_items = [(p, [tok(" " + o, add_special_tokens=False)["input_ids"][0] for o in opts], r)
                          for p, opts, r in items]
        seqs = [tok(p, add_special_tokens=False)["input_ids"] for p, _, _ in items + [(D.MC_CALIBRATION, 0, 0)]]
        self.sets["mc"] = Batch(seqs, [[(len(s) - 1, 0)] for s in seqs], self.pad)
        # new tasks
        nt = D.new_tasks(quick)
        self.new = nt
        for task in NEW:
            self.sets[task] = Batch(*_qa(tok, nt["eval"][task]), self.pad)
        for b in self.sets.values():
            b.encode(model, frozen)
        # keep only facts the base model answers exactly (greedy, teacher-forced == greedy decoding)
        ok = self._exact(model, self.sets["facts"])
        keep = [i for i, v in enumerate(ok) if v]
        self.info["facts_known"] = f"{len(keep)}/{len(ok)}"
        self._facts_keep = keep
        log(f"facts the base model answers: {len(keep)}/{len(ok)}; mc items: {len(self._mc_items)}")
        self.base = self.scores(model)
        log("base: " + " ".join(f"{k} {v:.3f}" for k, v in self.base.items()))

    @torch.no_grad()
    def _exact(self, model, b: Batch, idx=None) -> list[bool]:
        idx = list(range(b.ids.shape[0])) if idx is None else idx
        ok = []
        for s in range(0, len(idx), 64):
            chunk = idx[s:s + 64]
            logits, rows, toks = target_logits(model, b, chunk, self.frozen)
            hit = logits.argmax(-1) == toks
            for r in range(len(chunk)):
                ok.append(bool(hit[rows == r].all()))
        return ok

    @torch.no_grad()
    def _token(self, model, b: Batch) -> tuple[float, float]:
        """(top-1 accuracy, mean NLL) over all targets."""
        hits, nll, n = 0, 0.0, 0
        for s in range(0, b.ids.shape[0], 32):
            chunk = list(range(s, min(s + 32, b.ids.shape[0])))
            logits, _, toks = target_logits(model, b, chunk, self.frozen)
            logits = logits.float()
            hits += int((logits.argmax(-1) == toks).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, toks, reduction="sum"))
            n += len(toks)
        return hits / n, nll / n

    @torch.no_grad()
    def _mc(self, model) -> float:
        b = self.sets["mc"]
        logits, _, toks = target_logits(model, b, range(b.ids.shape[0]), self.frozen)
        logp = logits.float().log_softmax(-1)
        right = 0
        for i, (_, opts, r) in enumerate(self._mc_items):
            right += int(int((logp[i, opts] - logp[-1, opts]).argmax()) == r)
        return right / len(self._mc_items)

    @torch.no_grad()
    def scores(self, model) -> dict[str, float]:
        model.eval()
        out = {}
        out["text"], out["text_nll"] = self._token(model, self.sets["text"])
        keep = getattr(self, "_facts_keep", None)
        ok = self._exact(model, self.sets["facts"], keep)
        out["facts"] = sum(ok) / len(ok)
        out["chat"], out["chat_nll"] = self._token(model, self.sets["chat"])
        out["mc"] = self._mc(model)
        for task in NEW:
            ok = self._exact(model, self.sets[task])
            out[task] = sum(ok) / len(ok)
        return out

    def summary(self, s: dict) -> dict:
        """Adds `kept` (mean over OLD of score / base score), `new` (mean over NEW) and H."""
        kept = sum(s[k] / self.base[k] for k in OLD if self.base[k] > 0) / sum(self.base[k] > 0 for k in OLD)
        new = sum(s[t] for t in NEW) / len(NEW)
        h = 2 * kept * new / (kept + new) if kept + new > 0 else 0.0
        return {**s, "kept": kept, "new": new, "H": h}


def finite(row: dict) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))
