"""Create the tiny random student and teachers that ``examples/opd_tiny.toml`` trains with.

Nothing can be downloaded on the project's machines, so the example builds its models locally:
a 2-layer Llama student and two wider Qwen2 teachers (one per domain) sharing a character tokenizer.
Run once: ``python examples/make_tiny_models.py`` (writes ``examples/models/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from opd_fast.models.tiny import char_tokenizer, save_model, tiny_causal_lm


def main(out: str | Path = Path(__file__).parent / "models") -> None:
    out = Path(out)
    tok = char_tokenizer()
    specs = {
        "student": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "seed": 0},
        "teacher_copy": {"arch": "qwen2", "hidden_size": 96, "num_layers": 2, "seed": 1},
        "teacher_reverse": {"arch": "qwen2", "hidden_size": 96, "num_layers": 2, "seed": 2},
    }
    for name, spec in specs.items():
        save_model(tiny_causal_lm(tok, **spec), tok, out / name)
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
