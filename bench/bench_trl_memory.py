"""TRL's GKDTrainer loss with and without opd-fast: extra peak memory of one forward+backward, same loss.

    .venv/bin/python bench/bench_trl_memory.py [--vocab 131072] [--hidden 64] [--batch 4] [--seq 256]

``GKDTrainer.compute_loss`` materializes both models' ``B x L x V`` logits (and their softmaxes);
``opd_fast.integrations.trl.use_opd_fast`` computes the same generalized JSD from the hidden states.
Each arm runs in a fresh process on the same tiny Llama student and Qwen2 teacher (random weights,
the given vocabulary) and batch: one warm-up step, then the measured step (extra peak RSS on CPU, or
the CUDA allocator's peak, over the models, batch and gradients already allocated;
``opd_fast.benchmarking.memory``). Memory only: no timing, so it is meaningful on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

ARMS = ("trl", "opd-fast")


def _arm(name: str, args: argparse.Namespace) -> dict[str, float]:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opd_fast.benchmarking.memory import MB, PeakMeter
    from opd_fast.integrations.trl import use_opd_fast
    from opd_fast.models.tiny import char_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(vocab_size=args.vocab, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, **shape))
    teacher = Qwen2ForCausalLM(Qwen2Config(hidden_size=2 * args.hidden, intermediate_size=8 * args.hidden, **shape))
    config = GKDConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device.type == "cpu",
                       activation_checkpointing=False)
    trainer = GKDTrainer(model=student.to(device), teacher_model=teacher.to(device), args=config,
                         processing_class=char_tokenizer(),
                         train_dataset=Dataset.from_list([{"messages": [{"role": "user", "content": "a"}]}]))
    if name == "opd-fast":
        use_opd_fast(trainer)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, : args.seq // 4] = -100  # the prompt quarter does not count
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    meter = PeakMeter(device)
    for measured in (False, True):
        trainer.model.zero_grad(set_to_none=False)
        if measured:
            meter.start()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    return {"arm": name, "extra_peak_mb": meter.extra_bytes() / MB, "loss": float(loss), "method": meter.method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=64, help="student hidden size (the teacher's is twice)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in this process (the workers)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(_arm(args.arm, args)))
        return
    rows = []
    for arm in ARMS:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", arm], capture_output=True,
                              text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    logits_mb = 2 * args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"GKDTrainer.compute_loss, V={args.vocab}, B x L = {args.batch} x {args.seq} "
          f"(one fp32 logits tensor per model: {logits_mb / 2:.0f} MB); {rows[0]['method']}")
    for row in rows:
        print(f"  {row['arm']:>9}: extra peak {row['extra_peak_mb']:8.1f} MB   loss {row['loss']:.6f}")


if __name__ == "__main__":
    main()
