"""Python API: load an engine dir once, generate for a list of prompts.

    from trtc.runtime import LLM
    llm = LLM("engines/smollm2-135m-instruct", backend="onnxruntime")
    for c in llm.generate(["The capital of France is"], max_new_tokens=16):
        print(c.text)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trtc.errors import TrtcError

from .engine_dir import EngineDir, load_engine_dir
from .generator import generate_ids
from .sampler import SamplingParams
from .session import Session

BACKENDS = ("auto", "tensorrt", "onnxruntime")


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]             # generated ids only (EOS included when it ended the text)
    finish_reason: str
    prompt_token_ids: list[int] = field(default_factory=list)


def open_session(ed: EngineDir, backend: str = "auto") -> Session:
    """`auto`: TensorRT when this machine can run the engine, else ONNX Runtime on the kept
    graphs, else an error that says what is missing for each."""
    if backend not in BACKENDS:
        raise TrtcError(f"--backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if ed.config.mapping.world_size > 1:     # tensor parallel: a session over every rank
        from .tp_session import open_tp_session

        return open_tp_session(ed, backend)
    reason = None
    if ed.is_export or ed.attention == "plugin":
        # An export dir has no engine; running plugin-form engines in TensorRT (plugin registration,
        # paged KV buffers) is not written yet. Both run on the reference backend.
        reason = ("an export dir holds no engine (build one with `trtc build --model DIR`)" if ed.is_export else
                  "plugin-form engines (--attention plugin) run only on the onnxruntime reference backend "
                  "in this version")
        if backend == "tensorrt" or ed.onnx_file is None:
            fix = "use --backend onnxruntime" if ed.onnx_file else "rebuild with --keep-onnx for --backend onnxruntime"
            raise TrtcError(f"cannot run {ed.path} with the TensorRT backend: {reason}; {fix}")
        backend = "onnxruntime"
    if backend in ("auto", "tensorrt"):
        from .tensorrt_session import TensorRTSession

        try:
            return TensorRTSession(ed)
        except TrtcError as e:
            if backend == "tensorrt":
                raise
            reason = str(e)
            from trtc.log import info

            info(f"[trtc] TensorRT backend not usable here ({reason}); trying onnxruntime")
    from .ort_session import OnnxRuntimeSession

    if backend == "auto" and ed.onnx_file is None:
        raise TrtcError(f"cannot run {ed.path}: TensorRT is not usable here ({reason}), and the dir holds "
                        f"no ONNX graphs for the onnxruntime backend (rebuild with --keep-onnx)")
    if ed.attention == "plugin":
        from .ort_plugin_session import OnnxRuntimePluginSession

        return OnnxRuntimePluginSession(ed)
    return OnnxRuntimeSession(ed)


class LLM:
    def __init__(self, engine_dir: str | Path, backend: str = "auto"):
        from transformers import AutoTokenizer

        self.engine_dir = load_engine_dir(engine_dir)
        ed = self.engine_dir
        ed.verify(ed.tokenizer_files())
        self.session = open_session(ed, backend)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ed.path)
        except (OSError, ValueError, KeyError) as e:   # missing/corrupt tokenizer files
            raise TrtcError(f"cannot load the tokenizer files in {ed.path} ({type(e).__name__}: {e}); "
                            f"rebuild the engine dir") from e
        eos = set(ed.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = tuple(sorted(eos))

    @property
    def backend(self) -> str:
        return self.session.backend

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise TrtcError(f"the tokenizer in {self.engine_dir.path} has no chat template; drop --chat")
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False))
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Generate for all prompts (in batches of the engine's max batch size).

        on_text(i, delta) streams decoded text as it is generated."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ed = self.engine_dir
        encoded = [self.encode(p, chat) for p in prompts]
        out: list[Completion] = []
        for start in range(0, len(prompts), ed.max_batch_size):
            batch = encoded[start:start + ed.max_batch_size]
            shown = [""] * len(batch)
            gen: list[list[int]] = [[] for _ in batch]

            def on_token(i: int, t: int) -> None:
                if on_text is None:
                    return
                gen[i].append(t)
                text = self.tokenizer.decode(gen[i], skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(shown[i]):  # wait out partial UTF-8
                    on_text(start + i, text[len(shown[i]):])
                    shown[i] = text

            seqs = generate_ids(self.session, batch, max_new_tokens=max_new_tokens, params=params,
                                eos_ids=self.eos_ids, max_input_len=ed.max_input_len,
                                max_seq_len=ed.max_seq_len, on_token=on_token)
            for j, s in enumerate(seqs):
                out.append(Completion(prompt=prompts[start + j],
                                      text=self.tokenizer.decode(s.generated, skip_special_tokens=True),
                                      token_ids=s.generated, finish_reason=s.finish_reason or "length",
                                      prompt_token_ids=s.prompt_ids))
        return out
