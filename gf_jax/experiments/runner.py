"""The arm loop both protocols share: configure, train, evaluate and record each arm in turn,
rewriting the result files after every arm."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from gf_jax.experiments import tables
from gf_jax.experiments.arms import Arm
from gf_jax.experiments.io import say
from gf_jax.experiments.training import train_arm
from gf_jax.run.distributed import is_main_process


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What differs between experiments, as callables the loop calls for each arm.

    Attributes:
      tag: the console prefix (``memorization``, ``canary``).
      label: an arm's name in tables and plots.
      arm_config: an arm's validated run config.
      evaluate: ``(model, mesh, config, arm) -> result`` of a trained arm.
      write_outputs: ``(results so far) -> table``; writes the result files, on process 0 only.
    """

    tag: str
    label: Callable[[Arm], str]
    arm_config: Callable[[Arm], object]
    evaluate: Callable[..., dict]
    write_outputs: Callable[[dict], str]


def run_arms(protocol: Protocol, arms: dict[str, Arm], *, devices, fresh: bool, out: str) -> dict:
    """Trains and evaluates every arm, then prints the last table written (results in ``out``);
    returns {name: result}."""
    results: dict = {}
    table = None
    for name, arm in arms.items():
        config = protocol.arm_config(arm)
        say(f"[{protocol.tag}] arm {name}: {protocol.label(arm)}, {config.train.steps} steps")
        model, mesh, summary = train_arm(config, devices=devices, fresh=fresh)
        result = protocol.evaluate(model, mesh, config, arm)
        del model  # the next arm trains from scratch: its memory is free before that
        results[name] = record_arm(protocol.tag, arm, protocol.label(arm), config, summary, result)
        if is_main_process():  # after every arm: partial results survive an interruption
            table = protocol.write_outputs(results)
    if is_main_process():
        tables.print_summary(table, out)
    return results


def record_arm(tag: str, arm: Arm, label: str, config, summary: dict, result: dict) -> dict:
    """Annotates an arm's evaluation with how it was trained and logs its memorization line."""
    result.update(label=label, trains_on=arm.trains_on, run_dir=config.train.run_dir,
                  goldfish=dataclasses.asdict(arm.goldfish), train=summary)
    agg = result["memorization"]["aggregate"]
    say(f"[{tag}] arm {arm.name}: memorized {agg['n_memorized']}/{agg['n_documents']}, "
        f"RougeL {agg['rougeL_mean']:.3f}, exact match {agg['exact_match_mean']:.3f}")
    return result
