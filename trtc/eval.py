"""`trtc eval` (a tool over both halves: it runs an engine dir through the runtime and loads the
source model through the compiler's loader): perplexity of an engine dir's model on a text, and top-1 next-token agreement with
the unquantized source model.

The text is tokenized once and cut into non-overlapping windows of up to `window` tokens; each
window is one prefill step of the session (fresh KV cache, positions 0..S-1), which returns logits
for every position, so a window of S tokens scores S-1 next-token predictions. Windows run in
batches of the engine's max batch size. The reference model (transformers, float32, CPU) scores
the same windows: `reference_perplexity` is its perplexity, `top1_agreement` the fraction of
positions where both models' argmax agree. The default text (trtc/data/eval.txt) is disjoint from
the bundled calibration text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trtc.bundled import EVAL_TEXT, data_file
from trtc.errors import TrtcError

DEFAULT_WINDOW = 256


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    reference_perplexity: float | None
    top1_agreement: float | None
    tokens: int                 # scored next-token predictions
    windows: int
    backend: str
    reference: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def windows_of(ids: list[int], window: int) -> list[list[int]]:
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


def _score(logits: np.ndarray, w: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """logits [S, V] of one window -> (NLL of each next token [S-1], argmax [S-1])."""
    lp = _log_softmax(logits[: len(w) - 1])
    tgt = np.asarray(w[1:])
    return -lp[np.arange(len(tgt)), tgt], logits[: len(w) - 1].argmax(-1)


def _session_logits(session, batch: list[list[int]]) -> list[np.ndarray]:
    S = max(len(w) for w in batch)
    ids = np.zeros((len(batch), S), dtype=np.int64)
    for i, w in enumerate(batch):
        ids[i, : len(w)] = w
    pos = np.broadcast_to(np.arange(S, dtype=np.int64), ids.shape)
    session.allocate(len(batch))
    logits = session.step(ids, pos, np.array([len(w) for w in batch]))
    return [logits[i, : len(w)] for i, w in enumerate(batch)]


def _reference_model(reference: str):
    import torch

    from trtc.compiler.load import load_model, load_torch_model

    try:
        loaded = load_model(reference)
    except TrtcError as e:
        raise TrtcError(f"--reference: {e}") from e
    torch.set_grad_enabled(False)
    return load_torch_model(loaded, "float32")


def evaluate(engine_dir: str | Path, text_file: str | Path | None = None, reference: str | None = None,
             backend: str = "auto", window: int | None = None, no_reference: bool = False) -> EvalResult:
    from transformers import AutoTokenizer

    from trtc.runtime.api import open_session
    from trtc.runtime.engine_dir import load_engine_dir

    ed = load_engine_dir(engine_dir)
    path = Path(text_file) if text_file is not None else data_file(EVAL_TEXT)
    if not path.is_file():
        raise TrtcError(f"--text {path}: no such file; pass a UTF-8 text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise TrtcError(f"--text {path} is empty; pass a file with some text")
    ed.verify(ed.tokenizer_files())
    tok = AutoTokenizer.from_pretrained(ed.path)
    W = min(window or DEFAULT_WINDOW, ed.max_input_len)
    wins = windows_of(list(tok(text)["input_ids"]), W)
    if not wins:
        raise TrtcError(f"--text {path} has fewer than 2 tokens; give more text")
    session = open_session(ed, backend)

    ref_model = None
    ref_name = None
    if not no_reference:
        ref_name = reference or ed.config.source.hf_dir or ed.config.source.model
        if not ref_name:
            raise TrtcError(f"{ed.path} records no source model; pass --reference MODEL")
        ref_model = _reference_model(ref_name)

    nll, ref_nll, agree = [], [], []
    B = ed.max_batch_size
    for start in range(0, len(wins), B):
        batch = wins[start:start + B]
        ours = _session_logits(session, batch)
        ref = None
        if ref_model is not None:
            import torch

            ref = [ref_model(input_ids=torch.tensor([w])).logits[0].float().numpy() for w in batch]
        for i, w in enumerate(batch):
            n, top = _score(ours[i], w)
            nll.append(n)
            if ref is not None:
                rn, rtop = _score(ref[i], w)
                ref_nll.append(rn)
                agree.append(top == rtop)
    nll_all = np.concatenate(nll)
    return EvalResult(
        perplexity=float(np.exp(nll_all.mean())),
        reference_perplexity=float(np.exp(np.concatenate(ref_nll).mean())) if ref_nll else None,
        top1_agreement=float(np.concatenate(agree).mean()) if agree else None,
        tokens=int(nll_all.size), windows=len(wins), backend=session.backend, reference=ref_name)
