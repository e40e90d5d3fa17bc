"""The calibration token ids every later pass reads: random windows of the calibration text."""

from __future__ import annotations

import hashlib

import torch

from mqc.analysis.context import AnalysisContext, AnalysisPass
from mqc.data import calibration_batches
from mqc.errors import DataError
from mqc.passes import keys
from mqc.passes.base import PassResult

FILE = "calib.safetensors"


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class Calibrate(AnalysisPass):
    """Draw the calibration windows (the Brown calibration split, or the settings' file) with the
    tokenizer, or take ``ids`` given by the caller."""

    name = "calibrate"
    produces = (keys.CALIB,)

    def __init__(self, ids: torch.Tensor | None = None):
        self.ids = ids

    def analyze(self, ctx: AnalysisContext) -> PassResult:
        ids = self.ids
        if ids is None:
            if ctx.tokenizer is None:
                raise DataError("this recipe needs calibration data: pass calib=token ids or a tokenizer")
            c = ctx.settings.calib
            ids = calibration_batches(ctx.tokenizer, c.n_samples, c.seq_len, c.seed, c.file)
        vocab = ctx.stack.vocab_size()
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise DataError(f"calibration ids reach {int(ids.max())}, beyond the model's {vocab}-token vocabulary")
        ids = ids.to(torch.long).contiguous()
        ctx.store.put_tensors(FILE, {"ids": ids})
        ctx.store.manifest["calib_digest"] = digest(ids)
        ctx.results[keys.CALIB] = ids
        return PassResult(False, f"{ids.shape[0]} sequences of {ids.shape[1]} tokens")

    def restore(self, ctx: AnalysisContext) -> None:
        ids = ctx.store.tensors(FILE)["ids"]
        if self.ids is not None and digest(self.ids) != ctx.store.manifest["calib_digest"]:
            raise DataError(
                f"{ctx.store.root} was calibrated on other token ids than the ones given; analyze into another directory"
            )
        ctx.results[keys.CALIB] = ids
