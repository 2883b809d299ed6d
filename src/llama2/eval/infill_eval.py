"""Infilling evaluation of a code model on held-out source files.

Cases come from the held-out files (the same name-hash split as training, `llama2.data.fim`), drawn
at random with a seed. Two kinds of hole:
  - `line`: a whole line whose stripped text is 4-60 characters long (its text without the newline);
  - `identifier`: one occurrence of an identifier or keyword (`[A-Za-z_][A-Za-z0-9_]*`, 2+ characters).
The prefix is up to `context_chars` characters before the hole and the suffix up to `context_chars`
after it, both cut at line boundaries.

Metrics (per kind):
  - **exact match**: the model fills the hole greedily from the PSM or the SPM prompt
    (`llama2.infill.encode_infill`, `suffix_first` False/True; `modes` chooses which are run)
    until `▁<EOT>`; a case counts when the generated middle equals
    the hole (leading/trailing whitespace ignored). Reported strictly (the whole fill up to `▁<EOT>`)
    and for the fill's first unit (the caller knows the hole's kind: the fill's first line for a line
    hole, its leading identifier for an identifier hole). Chance level is ~0; as a baseline we report
    the exact match of always answering the most frequent line / identifier of the training files.
  - **middle NLL**: mean negative log-likelihood (nats/token) of the hole's tokens followed by
    `▁<EOT>`, teacher-forced after the same prompt, against a unigram model of the training files'
    tokens (add-one smoothed) on the very same tokens. Lower is better; the gap is what the model
    gains from the context.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from llama2.data.fim import default_source_dir, source_splits
from llama2.errors import ConfigError
from llama2.generation import Generator, SamplingParams
from llama2.infill import encode_infill, infill_ids
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

HoleKind = Literal["line", "identifier"]
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]+")


@dataclass(frozen=True)
class InfillCase:
    """One hole: `prefix + middle + suffix` is a span of a held-out file; `middle` is one line or
    one identifier (`line_no` is the hole's 1-based line)."""

    file: str
    line_no: int
    prefix: str
    middle: str
    suffix: str


@dataclass
class InfillEvalConfig:
    """`llama2 eval infill`: infilling exact match and middle NLL on held-out source files."""

    model: str = field(
        default="code",
        metadata={"help": "code model (with ▁<PRE> ... ▁<EOT> pieces): checkpoint path or embedded name"},
    )
    tokenizer: Path | None = None  # default: the checkpoint's (see llama2.checkpoint.tokenizer_path)
    source_dir: Path | None = None  # default: the running interpreter's standard library
    pattern: str = "*.py"
    heldout_fraction: float = 0.1  # must match the training split
    kinds: list[str] = field(default_factory=lambda: ["line", "identifier"])  # hole kinds to evaluate
    modes: list[str] = field(default_factory=lambda: ["psm", "spm"])  # prompt orders to evaluate
    n_cases: int = 200  # per kind
    seed: int = 0
    context_chars: int = 300  # characters of prefix and of suffix around the hole
    max_new_tokens: int = 40
    batch_size: int = 16
    device: str = "cpu"
    quantize: str | None = None  # quantize while loading: int8 | int4 | nf4 | q8_0 | q4_0 | q4_k[,options]
    out_json: Path | None = None
    samples: int = 8  # sample cases kept in the report

    # `--checkpoint` (and a `checkpoint` key) of earlier versions; every command names it `--model`.
    ALIASES: ClassVar[dict[str, str]] = {"checkpoint": "model"}


@dataclass
class InfillReport:
    """Results of `evaluate_infill` for one hole kind."""

    kind: str
    mode: str  # "psm" (prefix-suffix-middle) or "spm" (suffix-prefix-middle) prompts
    n_cases: int
    exact: int  # greedy fills equal to the hole
    exact_first_line: int  # first line / leading identifier of the greedy fills equal to the hole
    baseline_exact: int  # the most-frequent-training-line/identifier baseline
    baseline_line: str
    nll_model: float  # mean nats/token of middle + EOT under the model
    nll_unigram: float  # same tokens under the unigram baseline
    n_tokens: int  # tokens scored in the NLL
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exact_rate(self) -> float:
        return self.exact / max(1, self.n_cases)

    @property
    def first_line_rate(self) -> float:
        return self.exact_first_line / max(1, self.n_cases)

    @property
    def baseline_rate(self) -> float:
        return self.baseline_exact / max(1, self.n_cases)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "n_cases": self.n_cases,
            "exact_match": self.exact_rate,
            "exact_match_first_unit": self.first_line_rate,
            "baseline_most_frequent_exact_match": self.baseline_rate,
            "baseline_answer": self.baseline_line,
            "middle_nll_model_nats_per_token": self.nll_model,
            "middle_nll_unigram_nats_per_token": self.nll_unigram,
            "middle_tokens": self.n_tokens,
            "samples": self.samples,
        }

    def format_table(self) -> str:
        return "\n".join(
            [
                f"{self.kind} holes, {self.mode.upper()} prompts: {self.n_cases} held-out cases "
                f"({self.n_tokens} middle tokens); "
                f"baseline: always {self.baseline_line!r} / unigram",
                f"{'metric':<38} {'model':>8} {'baseline':>9}",
                f"{'exact match (fill to EOT)':<38} {self.exact_rate:>8.1%} {self.baseline_rate:>9.1%}",
                f"{'exact match (first ' + self.kind + ')':<38} "
                f"{self.first_line_rate:>8.1%} {self.baseline_rate:>9.1%}",
                f"{'middle NLL (nats/token, lower=better)':<38} "
                f"{self.nll_model:>8.3f} {self.nll_unigram:>9.3f}",
            ]
        )


# ---------------------------------------------------------------------------------------- cases
def _context(text: str, start: int, end: int, context_chars: int) -> tuple[str, str]:
    """Up to `context_chars` before `start` and after `end`, cut at line boundaries."""
    before = text[max(0, start - context_chars) : start]
    if start - context_chars > 0 and "\n" in before:
        before = before.split("\n", 1)[1]
    after = text[end : end + context_chars]
    if end + context_chars < len(text) and "\n" in after:
        after = after[: after.rindex("\n") + 1]
    return before, after


def make_identifier_cases(
    files: Sequence[Path], n_cases: int, seed: int = 0, context_chars: int = 300
) -> list[InfillCase]:
    """Draw `n_cases` identifier holes from `files`; reproducible for a seed."""
    texts = [p.read_text(encoding="utf-8") for p in files]
    candidates = [(fi, m.start(), m.end()) for fi, t in enumerate(texts) for m in IDENTIFIER.finditer(t)]
    if len(candidates) < n_cases:
        raise ConfigError(f"only {len(candidates)} identifiers in {len(files)} files; asked for {n_cases}")
    rng = random.Random(f"infill-identifiers/{seed}")
    cases = []
    for fi, start, end in sorted(rng.sample(candidates, n_cases)):
        text = texts[fi]
        before, after = _context(text, start, end, context_chars)
        line_no = text.count("\n", 0, start) + 1
        cases.append(InfillCase(files[fi].name, line_no, before, text[start:end], after))
    return cases


def most_frequent_identifier(files: Sequence[Path]) -> str:
    """The most frequent identifier of `files` — the identifier exact-match baseline."""
    counts: Counter[str] = Counter()
    for path in files:
        counts.update(IDENTIFIER.findall(path.read_text(encoding="utf-8")))
    return counts.most_common(1)[0][0] if counts else ""


def make_cases(
    files: Sequence[Path], n_cases: int, seed: int = 0, context_chars: int = 300
) -> list[InfillCase]:
    """Draw `n_cases` line holes from `files`; reproducible for a seed."""
    candidates: list[tuple[int, int]] = []  # (file index, line index)
    texts: list[list[str]] = []
    for fi, path in enumerate(files):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        texts.append(lines)
        candidates += [(fi, li) for li, line in enumerate(lines) if 4 <= len(line.strip()) <= 60]
    if len(candidates) < n_cases:
        raise ConfigError(
            f"only {len(candidates)} candidate lines in {len(files)} files; asked for {n_cases}"
        )
    rng = random.Random(f"infill-cases/{seed}")
    cases = []
    for fi, li in sorted(rng.sample(candidates, n_cases)):
        lines = texts[fi]
        before: list[str] = []
        after: list[str] = []
        size = 0
        for line in reversed(lines[:li]):
            if size + len(line) > context_chars:
                break
            before.insert(0, line)
            size += len(line)
        size = 0
        line = lines[li]
        middle = line.rstrip("\r\n")
        rest = [line[len(middle) :], *lines[li + 1 :]]
        for piece in rest:
            if size + len(piece) > context_chars and after:
                break
            after.append(piece)
            size += len(piece)
        cases.append(InfillCase(files[fi].name, li + 1, "".join(before), middle, "".join(after)))
    return cases


def most_frequent_line(files: Sequence[Path]) -> str:
    """The most frequent stripped line (4-60 characters) of `files` — the exact-match baseline."""
    counts: Counter[str] = Counter()
    for path in files:
        counts.update(
            s
            for s in (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
            if 4 <= len(s) <= 60
        )
    return counts.most_common(1)[0][0] if counts else ""


def unigram_logprobs(files: Sequence[Path], tokenizer: Tokenizer) -> torch.Tensor:
    """log p(token) (vocab_size,) from the token counts of `files`, add-one smoothed; `▁<EOT>` gets
    the frequency of one per file line-hole (it is not in plain text), i.e. the add-one count."""
    counts = torch.ones(tokenizer.vocab_size, dtype=torch.float64)  # add-one
    for path in files:
        ids = tokenizer.encode(path.read_text(encoding="utf-8"), bos=False, eos=False)
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=tokenizer.vocab_size).double()
    return (counts / counts.sum()).log().float()


# ------------------------------------------------------------------------------------ evaluation
def _fit_prompt(case: InfillCase, tokenizer: Tokenizer, budget: int, suffix_first: bool = False) -> list[int]:
    """PSM prompt for a case, trimming prefix/suffix lines until it fits `budget` tokens."""
    prefix, suffix = case.prefix, case.suffix
    while True:
        prompt = encode_infill(prefix, suffix, tokenizer, suffix_first=suffix_first)
        if len(prompt) <= budget or (not prefix and not suffix):
            return prompt
        if len(prefix) >= len(suffix):
            prefix = prefix.split("\n", 1)[1] if "\n" in prefix else ""
        else:
            suffix = suffix.rsplit("\n", 2)[0] + "\n" if suffix.count("\n") >= 2 else ""


def first_unit(fill: str, kind: HoleKind) -> str:
    """The part of a fill a caller who knows the hole's kind would keep: the first line (stripped)
    for a line hole, the leading identifier for an identifier hole."""
    if kind == "line":
        return fill.split("\n", 1)[0].strip()
    m = IDENTIFIER.match(fill.lstrip())
    return m.group(0) if m else ""


def evaluate_infill(
    model: Transformer,
    tokenizer: Tokenizer,
    cases: Sequence[InfillCase],
    unigram: torch.Tensor,
    baseline_line: str = "",
    max_new_tokens: int = 40,
    batch_size: int = 16,
    samples: int = 8,
    kind: HoleKind = "line",
    suffix_first: bool = False,
) -> InfillReport:
    """Exact match (greedy) and middle NLL of `model` on `cases` of one hole kind (see the module
    docstring)."""
    if not cases:
        raise ConfigError("no infill cases to evaluate")
    _, _, _, eot = infill_ids(tokenizer)
    max_len = model.args.max_seq_len
    prompts = [_fit_prompt(c, tokenizer, max_len - max_new_tokens, suffix_first) for c in cases]
    gen = Generator(model, tokenizer)
    greedy = SamplingParams(temperature=0.0)
    fills: list[str] = []
    nll_sum, uni_sum, n_tok = 0.0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            results = gen.generate(prompts[i : i + batch_size], max_new_tokens, greedy, stop_token_ids=[eot])
            fills += [tokenizer.decode_infilling(r.tokens) for r in results]
        model.clear_caches()
        for prompt, case in zip(prompts, cases, strict=True):
            target = [*tokenizer.encode_infilling(case.middle), eot]
            seq = (prompt + target)[-max_len - 1 :]
            n_t = min(len(target), len(seq) - 1)
            inp = torch.tensor([seq[:-1]], dtype=torch.long)  # (1, L)
            logits = model(inp)[0, -n_t:]  # (n_t, V)
            tgt = torch.tensor(seq[-n_t:], dtype=torch.long)  # (n_t,)
            nll_sum += float(F.cross_entropy(logits.float(), tgt, reduction="sum"))
            uni_sum += float(-unigram[tgt].sum())
            n_tok += n_t
    exact = [f.strip() == c.middle.strip() for f, c in zip(fills, cases, strict=True)]
    first = [first_unit(f, kind) == c.middle.strip() for f, c in zip(fills, cases, strict=True)]
    base = [baseline_line == c.middle.strip() for c in cases]
    kept: list[dict[str, Any]] = [
        {
            "file": c.file,
            "line": c.line_no,
            "expected": c.middle,
            "generated": f,
            "correct": ok,
            "first_line": fl,
        }
        for c, f, ok, fl in zip(cases, fills, exact, first, strict=True)
    ]
    good = [k for k in kept if k["correct"] or k["first_line"]]
    chosen = good[: samples // 2]
    rest = [k for k in kept if k not in chosen]
    chosen += random.Random(0).sample(rest, min(samples - len(chosen), len(rest)))
    return InfillReport(
        kind=kind,
        mode="spm" if suffix_first else "psm",
        n_cases=len(cases),
        exact=sum(exact),
        exact_first_line=sum(first),
        baseline_exact=sum(base),
        baseline_line=baseline_line,
        nll_model=nll_sum / max(1, n_tok),
        nll_unigram=uni_sum / max(1, n_tok),
        n_tokens=n_tok,
        samples=chosen,
    )


def run_infill_eval(cfg: InfillEvalConfig) -> dict[str, InfillReport]:
    """Load a code model, build the held-out cases and baselines for each hole kind, evaluate,
    print the tables and save the JSON.

    Returns:
        One report per hole kind.
    """
    from llama2.checkpoint.load import load_model
    from llama2.checkpoint.tokenizer_path import require_tokenizer
    from llama2.outpath import check_output_path, write_error

    if cfg.out_json is not None:  # before the model is loaded and the suite run
        check_output_path(cfg.out_json, folder=False, what="out_json")
    bad = [k for k in cfg.kinds if k not in ("line", "identifier")]
    if bad or not cfg.kinds:
        raise ConfigError(
            f"infill kinds must be a non-empty subset of ['line', 'identifier'], got {cfg.kinds}"
        )
    loaded = load_model(
        cfg.model, device=cfg.device, dtype=torch.float32, progress=False, quantize=cfg.quantize
    )
    tok_path = require_tokenizer(loaded.tokenizer_path, cfg.tokenizer, cfg.model, "pass --tokenizer PATH")
    tokenizer = Tokenizer.from_file(tok_path)
    root = cfg.source_dir or default_source_dir()
    train_files, held_files = source_splits(root, cfg.pattern, cfg.heldout_fraction)
    unigram = unigram_logprobs(train_files, tokenizer)
    bad_modes = [m for m in cfg.modes if m not in ("psm", "spm")]
    if bad_modes or not cfg.modes:
        raise ConfigError(f"infill modes must be a non-empty subset of ['psm', 'spm'], got {cfg.modes}")
    reports: dict[str, InfillReport] = {}
    for kind in cfg.kinds:
        if kind == "line":
            cases = make_cases(held_files, cfg.n_cases, cfg.seed, cfg.context_chars)
            baseline, max_new = most_frequent_line(train_files), cfg.max_new_tokens
        else:
            cases = make_identifier_cases(held_files, cfg.n_cases, cfg.seed, cfg.context_chars)
            baseline, max_new = most_frequent_identifier(train_files), min(cfg.max_new_tokens, 12)
        for mode in cfg.modes:
            report = evaluate_infill(
                loaded.model, tokenizer, cases, unigram, baseline, max_new, cfg.batch_size, cfg.samples,
                kind="line" if kind == "line" else "identifier", suffix_first=mode == "spm",
            )  # fmt: skip
            print(report.format_table(), flush=True)
            reports[f"{kind}/{mode}"] = report
    if cfg.out_json is not None:
        out = Path(cfg.out_json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            data = {k: r.to_json() for k, r in reports.items()}
            out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise write_error("out_json", out, e) from None
    return reports
