"""Lesson 10's fused experts: grouped_mm vs sorted runs, next to transformers' Mixtral and the dense model.

One script run, interleaved (``hf_models.benchmarking.time_interleaved``), on one set of weights:

* a training step (forward, backward, AdamW) of the zoo MoE with each dispatch of ``MoEExperts``
  (``grouped_mm``: one ``torch._grouped_mm`` per projection; ``sorted_runs``: one matmul per expert),
  of ``MixtralForCausalLM`` (same weights, through the converter) and of the dense zoo decoder of
  equal active parameters (one SwiGLU ``k`` experts wide), at recipe 10's default shape;
* greedy generation at batch 1 of the two zoo dispatches and Mixtral, checked to give the same tokens.

Prints the machine (``describe_machine``: CPU, threads, OMP wait policy, load average) and paired ratios
with their q1-q3 band; writes the samples to ``benchmarks/results/moe_dispatch.json``. Threads: all
usable cores by default (``--threads``), with OpenMP's passive wait (``prepare_benchmark``) as the
other scripts here. About two minutes with the defaults on 2 CPU cores.

    python benchmarks/moe_dispatch.py                 # recipe 10's default shape
    python benchmarks/moe_dispatch.py --threads 1 --rounds 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM, MoEDecoderConfig, MoEDecoderForCausalLM
from hf_models.benchmarking import prepare_benchmark, time_interleaved
from hf_models.conversion import moe_to_mixtral

DISPATCHES = ("grouped_mm", "sorted_runs")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--num_key_value_heads", type=int, default=2)
    parser.add_argument("--num_local_experts", type=int, default=8)
    parser.add_argument("--num_experts_per_tok", type=int, default=2)
    parser.add_argument("--expert_intermediate_size", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0, the default: every usable core)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_dispatch.json")
    return parser.parse_args()


def with_dispatch(model: MoEDecoderForCausalLM, dispatch: str) -> MoEDecoderForCausalLM:
    twin = MoEDecoderForCausalLM(model.config)
    twin.load_state_dict(model.state_dict())
    for layer in twin.model.layers:
        layer.mlp.experts.dispatch = dispatch
    return twin


def training_step(model: torch.nn.Module, batch: torch.Tensor):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    model.eval()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    return run


def main() -> None:
    args = parse_args()
    machine = prepare_benchmark(args.threads)  # passive OpenMP waits, pinned threads, the machine printed
    start = time.perf_counter()
    torch.manual_seed(0)
    config = MoEDecoderConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        num_local_experts=args.num_local_experts, num_experts_per_tok=args.num_experts_per_tok,
        intermediate_size=args.expert_intermediate_size, max_position_embeddings=args.block_size + args.new_tokens,
        initializer_range=0.1,  # router logits large enough that routing depends on the token
    )
    base = MoEDecoderForCausalLM(config)
    zoo = {f"zoo MoE {d}": with_dispatch(base, d) for d in DISPATCHES}
    mixtral = moe_to_mixtral(base)
    dense = ModernDecoderForCausalLM(ModernDecoderConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.num_experts_per_tok * args.expert_intermediate_size, max_position_embeddings=config.max_position_embeddings,
    ))
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), generator=torch.Generator().manual_seed(0))

    train = time_interleaved({**{n: training_step(m, batch) for n, m in zoo.items()}, "transformers Mixtral": training_step(mixtral, batch),
                              "zoo dense": training_step(dense, batch)}, rounds=args.rounds, warmup=2)

    # Generation from the untouched weights (the training steps above changed their copies).
    zoo = {f"zoo MoE {d}": with_dispatch(base, d) for d in DISPATCHES}
    mixtral = moe_to_mixtral(base)
    prompt = batch[:1, :8]
    generators = {**{n: generation(m, prompt, args.new_tokens) for n, m in zoo.items()}, "transformers Mixtral": generation(mixtral, prompt, args.new_tokens)}
    outputs = {n: g() for n, g in generators.items()}
    same_tokens = all(torch.equal(o, outputs["transformers Mixtral"]) for o in outputs.values())
    generate = time_interleaved(generators, rounds=args.rounds, warmup=1)

    report = dict(machine=dataclasses.asdict(machine), load_average_1min_after=os.getloadavg()[0], seconds=time.perf_counter() - start,
                  args={k: str(v) for k, v in vars(args).items()},
                  mixtral_experts_implementation=mixtral.config._experts_implementation, same_greedy_tokens=same_tokens,
                  training=train.to_dict(), generation=generate.to_dict(), ratios={})
    print(f"training step, batch {args.batch_size}x{args.block_size}: ratio = baseline time / contender time, median (q1-q3)")
    for d in DISPATCHES:
        name = f"zoo MoE {d}"
        for baseline in ("transformers Mixtral", "zoo dense"):
            ratio = train.speedup(name, baseline)
            report["ratios"][f"train {d} vs {baseline}"] = dataclasses.asdict(ratio)
            print(f"  {name:24s} vs {baseline:22s} {ratio.band()}")
    ratio = train.speedup("zoo MoE grouped_mm", "zoo MoE sorted_runs")
    report["ratios"]["train grouped_mm vs sorted_runs"] = dataclasses.asdict(ratio)
    print(f"  grouped_mm vs sorted_runs {ratio.band()}")
    print(f"greedy generation, batch 1, {args.new_tokens} new tokens (same tokens as Mixtral: {same_tokens})")
    for d in DISPATCHES:
        ratio = generate.speedup(f"zoo MoE {d}", "transformers Mixtral")
        report["ratios"][f"generate {d} vs Mixtral"] = dataclasses.asdict(ratio)
        print(f"  zoo MoE {d:13s} vs transformers Mixtral  {ratio.band()}")
    ratio = generate.speedup("zoo MoE grouped_mm", "zoo MoE sorted_runs")
    report["ratios"]["generate grouped_mm vs sorted_runs"] = dataclasses.asdict(ratio)
    print(f"  grouped_mm vs sorted_runs {ratio.band()}")
    print(f"load average (1 min): {machine.load_average_1min} before, {report['load_average_1min_after']:.2f} after; "
          f"{report['seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
