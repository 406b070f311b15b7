"""Real images: finc, cinc, emerging and glow1x1 on Fashion-MNIST at equal budget.

    python bench/fashion.py                          # the study: train, then report (~1 hour)
    python bench/fashion.py --report-only            # the report again from runs/fashion
    python bench/fashion.py --seeds 0 --cpu-budget 30 --equal-steps 60 --eval-subset 500
                                                     # a quick look

Every run is one process on one core (1 Numba thread, 1 BLAS thread), --parallel of them at
a time. Each trains a flow of L = --levels levels of K = --steps steps, coupling width --hidden,
affine coupling, k = 3, on the 60,000 training images (8 bits, batch --batch-size, Adam lr 1e-3
with a 200-step warm-up, gradient norm clipped at 50, as train.run does), and reports two
budgets from the same run:

- equal steps: the test bits/dim after --equal-steps steps (which layer learns more per step);
- equal time: the test bits/dim after --cpu-budget seconds of training (which layer learns more
  per second of CPU, the papers' practical claim).

Time is the process's CPU time (``time.process_time``) spent in training steps, evaluations
excluded: with one thread per process it equals the wall time of a quiet core, and it is not
inflated when another process shares the core. --equal-steps must be reachable by every layer
within --cpu-budget (checked: the run says so). Test bits/dim is over the whole test set
(10,000 images, dequantized with fixed noise, as train.evaluate); the learning curves use the
first --eval-subset test images every --curve-every steps.

After training, one process per model measures on one thread, on an otherwise idle machine
(run nothing beside it): the time to sample 100 images at T = 0.7 at 28×28 and at 4× the side
(112×112, the same weights: every layer is convolutional), best of --repeats, cinc both with
its published raster-scan inverse and with nfcore's wavefront; the reconstruction error
max |decode(encode(x)) − x| on 64 test images; a sample grid at T = 0.7.

Writes runs/fashion/<invconv>-s<seed>/ (checkpoint.h5, result.json, curve.json, samples.png)
and, with --figures DIR (default docs), fashion_curves.png (bits/dim against step and against
CPU seconds), fashion_samples.png (one panel per layer) and fashion.md (the table).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

STEP_KINDS = ("finc", "cinc", "emerging", "glow1x1")
N_BITS = 8
BIG = 4            # the sampling test at 4× the side


# ---- one training run (a worker process) ----------------------------------------------------

def train_worker(args):
    """Train one model; write result.json, curve.json and checkpoint.h5 into its folder."""
    from data.batching import Batches
    from data.loaders import load_dataset
    from nfcore.flow import Flow
    from nfcore.optim import Adam
    from train.session import save_training_checkpoint
    from train.cli import limit_blas_threads
    from train.session import evaluate_bits_per_dim

    limit_blas_threads(1)
    out = run_folder(args.out, args.invconv, args.seed)
    os.makedirs(out, exist_ok=True)
    train_images, test_images = load_dataset("fashion-mnist", args.data_dir)
    batches = Batches(train_images, args.batch_size, N_BITS, args.seed)
    flow = Flow((1, 28, 28), levels=args.levels, steps=args.steps, hidden=args.hidden,
                invconv=args.invconv, coupling="affine", k=3, seed=args.seed)
    flow.forward(batches(0))                                  # ActNorm initialization
    optimizer = Adam(flow.layers, lr=1e-3, warmup_steps=200, max_grad_norm=50.0)
    flow.loss_and_backward(batches(0), N_BITS)                # compiles every kernel of a step
    optimizer.zero_grad()                                     # before the clock: no update made

    def evaluate(images):
        return evaluate_bits_per_dim(flow, images, N_BITS, 500, args.seed)

    curve, result, window = [], {}, []
    cpu_s, wall_s, step = 0.0, 0.0, 0
    while cpu_s < args.cpu_budget:
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        optimizer.zero_grad()
        loss, _ = flow.loss_and_backward(batches(step), N_BITS)
        optimizer.step()
        cpu_s += time.process_time() - cpu_start
        wall_s += time.perf_counter() - wall_start
        step += 1
        if not np.isfinite(loss):
            raise SystemExit(f"{args.invconv} seed {args.seed}: loss {loss} at step {step}")
        window.append(loss)
        if step % args.curve_every == 0:
            curve.append({"step": step, "cpu_s": cpu_s, "wall_s": wall_s,
                          "train_bpd": float(np.mean(window)),
                          "test_bpd_subset": evaluate(test_images[:args.eval_subset])})
            window = []
            print(f"{args.invconv} s{args.seed} step {step} cpu {cpu_s:.0f} s: "
                  f"{curve[-1]['train_bpd']:.4f} / {curve[-1]['test_bpd_subset']:.4f}", flush=True)
        if step == args.equal_steps:
            result["equal_steps"] = {"steps": step, "cpu_s": cpu_s,
                                     "test_bpd": evaluate(test_images)}
    if "equal_steps" not in result:
        raise SystemExit(f"{args.invconv} seed {args.seed}: only {step} steps within "
                         f"--cpu-budget {args.cpu_budget} s, fewer than --equal-steps "
                         f"{args.equal_steps}: raise the budget or lower the steps")
    result["equal_time"] = {"steps": step, "cpu_s": cpu_s, "test_bpd": evaluate(test_images)}
    result.update(invconv=args.invconv, seed=args.seed, n_params=flow.n_params(),
                  images_per_cpu_s=step * args.batch_size / cpu_s,
                  images_per_wall_s=step * args.batch_size / wall_s)
    save_training_checkpoint(os.path.join(out, "checkpoint.h5"), flow, optimizer,
                             {"config": dict(flow.config, dataset="fashion-mnist", n_bits=N_BITS,
                                             image_shape=[1, 28, 28], batch_size=args.batch_size),
                              "step": step})
    write_json(os.path.join(out, "curve.json"), curve)
    write_json(os.path.join(out, "result.json"), result)


def run_folder(out, invconv, seed):
    return os.path.join(out, f"{invconv}-s{seed}")


def write_json(path, value):
    """Write JSON atomically (a temporary file renamed into place)."""
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump(value, file, indent=2)
    os.replace(temporary, path)


# ---- the measurements after training (one process per model, one thread) --------------------

def measure_worker(args):
    """Sampling times, reconstruction error and a sample grid of one trained model."""
    from data import preprocess
    from data.loaders import load_dataset
    from nfcore.conditioning import round_trip_error
    from nfcore.flow import Flow
    from nfcore.layers import CInCConv
    from train.cli import limit_blas_threads
    from train.images import save_image_grid
    from train.session import load_flow

    limit_blas_threads(1)
    out = run_folder(args.out, args.invconv, args.seed)
    flow, _, _ = load_flow(os.path.join(out, "checkpoint.h5"))
    _, test_images = load_dataset("fashion-mnist", args.data_dir)
    x = preprocess(test_images[:64], N_BITS, np.random.default_rng([args.seed, 5]))
    measured = {"recon_error": round_trip_error(flow, x)}
    images, measured["overflowed_samples"] = finite_samples(flow, 64, 0.7, args.seed)
    save_image_grid(images, os.path.join(out, "samples.png"), scale=2)

    big = Flow((1, 28 * BIG, 28 * BIG), **{key: flow.config[key] for key in
                                            ("levels", "steps", "hidden", "invconv", "coupling", "k")})
    for layer, big_layer in zip(flow.layers, big.layers):
        for name, param in layer.params.items():
            big_layer.params[name][...] = param
    big.load_state(flow.state())
    methods = ["raster", "wavefront"] if args.invconv == "cinc" else [None]
    for method in methods:
        for model, size in ((flow, 28), (big, 28 * BIG)):
            for layer in model.layers:
                if isinstance(layer, CInCConv):
                    layer.inverse_method = method
            key = f"sample100_{size}" + (f"_{method}" if method else "")
            times, measured[key + "_finite"] = sampling_times(model, args.repeats)
            measured[key] = min(times)
    result_path = os.path.join(out, "result.json")
    with open(result_path) as file:
        result = json.load(file)
    result["measured"] = measured
    write_json(result_path, result)
    print(f"{args.invconv} s{args.seed}: {measured}", flush=True)


def finite_samples(flow, n, temperature, seed):
    """(n uint8 images, how many draws overflowed): samples drawn one at a time (generator
    [seed, 4, i]) until n are finite. A short-trained model sends a rare latent (about 1 in 100
    at T = 0.7 here) to NaN/Inf through a coupling's division by a tiny scale; the count says
    how rare."""
    from data import postprocess
    from nfcore.layers import NonFiniteError

    images, overflowed, draw = [], 0, 0
    while len(images) < n:
        try:
            images.append(flow.sample(1, temperature, np.random.default_rng([seed, 4, draw]),
                                      tolerance=None))
        except NonFiniteError:
            overflowed += 1
        draw += 1
    return postprocess(np.concatenate(images), N_BITS), overflowed


def sampling_times(model, repeats):
    """(seconds of each of ``repeats`` calls drawing 100 samples at T = 0.7, after one warm-up
    call; were all the samples finite). A model trained at 28×28 may overflow at 112×112 (its
    inverse is worse conditioned there: nfcore/conditioning.py): such a call is still timed to
    its end, where Flow.sample finds the NaN/Inf, and reported as not finite. The sample check
    is off (tolerance None), the same for every model."""
    from nfcore.layers import NonFiniteError

    times, finite = [], True
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        try:
            model.sample(100, 0.7, np.random.default_rng(repeat), tolerance=None)
        except NonFiniteError:
            finite = False
        if repeat:                                            # the first call compiles
            times.append(time.perf_counter() - start)
    return times, finite


# ---- the study: workers, then the report ----------------------------------------------------

def worker_command(args, mode, invconv, seed):
    command = [sys.executable, os.path.abspath(__file__), f"--{mode}-worker", invconv,
               "--seed", str(seed), "--out", args.out]
    for option in ("levels", "steps", "hidden", "batch_size", "cpu_budget", "equal_steps",
                   "curve_every", "eval_subset", "repeats"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return command


def run_workers(commands, parallel):
    """Run the commands, ``parallel`` at a time, each on one Numba thread; stop on a failure."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(subprocess.Popen(pending.pop(0), env=env))
        time.sleep(0.5)
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                if process.returncode:
                    for other in running:
                        other.terminate()
                    raise SystemExit(f"error: {' '.join(process.args)} failed "
                                     f"(exit status {process.returncode})")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mean_spread(values):
    """'mean ± half the range' of a list of numbers (the range over seeds)."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4f} ± {(values.max() - values.min()) / 2:.4f}"


def mean_spread_time(values):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"


def sampling_cell(rows, key):
    """Mean ± half the range of the sampling times, and how many models' samples overflowed."""
    cell = mean_spread_time([r["measured"][key] for r in rows])
    overflowed = sum(not r["measured"].get(key + "_finite", True) for r in rows)
    return cell + (f" ({overflowed} of {len(rows)} overflow)" if overflowed else "")


def load_results(args):
    results = {}
    for invconv in args.invconv:
        for seed in args.seeds:
            with open(os.path.join(run_folder(args.out, invconv, seed), "result.json")) as file:
                results[invconv, seed] = json.load(file)
    return results


def report(args):
    """The table (markdown), the curves and the sample panels."""
    results = load_results(args)
    lines = [f"Fashion-MNIST, L={args.levels}, K={args.steps}, width {args.hidden}, affine "
             f"coupling, k=3, batch {args.batch_size}, seeds {', '.join(map(str, args.seeds))} "
             f"(mean ± half the range over seeds); equal steps = {args.equal_steps} steps, equal "
             f"time = {args.cpu_budget:g} CPU seconds of training (1 thread); test bits/dim over "
             f"the 10,000 test images; sampling 100 images at T = 0.7 on 1 thread, best of "
             f"{args.repeats} (the sample check off; a model whose samples overflow to NaN/Inf "
             f"at 112² is timed all the same and counted). Overflowed draws: samples at T = 0.7, "
             f"drawn one at a time for the grids (64 finite per model), that overflowed to "
             f"NaN/Inf, summed over the seeds.", "",
             "| step | params | test bpd, equal steps | test bpd, equal time | last 3 curve points "
             "| steps in the time | train img/CPU-s | sample 100, 28² (s) | sample 100, 112² (s) "
             "| recon error | overflowed draws |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    curves = {(invconv, seed): load_curve(args, invconv, seed)
              for invconv in args.invconv for seed in args.seeds}
    for invconv in args.invconv:
        rows = [results[invconv, seed] for seed in args.seeds]
        sample_keys = ([("cinc (published, raster)", "_raster"), ("cinc (wavefront)", "_wavefront")]
                       if invconv == "cinc" else [(invconv, "")])
        for label, suffix in sample_keys:
            lines.append(
                f"| {label} | {rows[0]['n_params']:,} "
                f"| {mean_spread([r['equal_steps']['test_bpd'] for r in rows])} "
                f"| {mean_spread([r['equal_time']['test_bpd'] for r in rows])} "
                f"| {mean_spread([np.mean([p['test_bpd_subset'] for p in curves[invconv, seed][-3:]]) for seed in args.seeds])} "
                f"| {np.mean([r['equal_time']['steps'] for r in rows]):.0f} "
                f"| {np.mean([r['images_per_cpu_s'] for r in rows]):.0f} "
                f"| {sampling_cell(rows, 'sample100_28' + suffix)} "
                f"| {sampling_cell(rows, f'sample100_{28 * BIG}' + suffix)} "
                f"| {max(r['measured']['recon_error'] for r in rows):.1e} "
                f"| {sum(r['measured']['overflowed_samples'] for r in rows)} |")
    lines += ["", f"Test bits/dim of one model fluctuates by about 0.1 between neighbouring "
              f"evaluations (no learning-rate decay, no averaged weights): \"last 3 curve "
              f"points\" is the mean over the last three evaluations of the learning curve "
              f"(first {args.eval_subset} test images, every {args.curve_every} steps) within "
              f"the time budget, a steadier equal-time figure."]
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.figures, exist_ok=True)
    with open(os.path.join(args.figures, "fashion.md"), "w") as file:
        file.write(table + "\n")
    plot_curves(args, os.path.join(args.figures, "fashion_curves.png"))
    plot_samples(args, os.path.join(args.figures, "fashion_samples.png"))


def load_curve(args, invconv, seed):
    with open(os.path.join(run_folder(args.out, invconv, seed), "curve.json")) as file:
        return json.load(file)


def plot_curves(args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for index, invconv in enumerate(args.invconv):
        for seed in args.seeds:
            curve = load_curve(args, invconv, seed)
            label = invconv if seed == args.seeds[0] else None
            bpd = [point["test_bpd_subset"] for point in curve]
            by_step.plot([p["step"] for p in curve], bpd, color=f"C{index}", label=label, alpha=0.8)
            by_time.plot([p["cpu_s"] for p in curve], bpd, color=f"C{index}", label=label, alpha=0.8)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("CPU seconds of training (1 thread)")
    by_step.set_ylabel(f"test bits/dim (first {args.eval_subset} test images)")
    for axes in (by_step, by_time):
        axes.grid(True, alpha=0.3)
        axes.legend()
    lows = [min(point["test_bpd_subset"] for point in load_curve(args, invconv, seed))
            for invconv in args.invconv for seed in args.seeds]
    by_step.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    figure.suptitle(f"Fashion-MNIST, L={args.levels}, K={args.steps}, width {args.hidden}, "
                    f"{len(args.seeds)} seeds each")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_samples(args, path):
    """One panel per layer: the first seed's sample grid at T = 0.7."""
    from PIL import Image, ImageDraw

    panels = [Image.open(os.path.join(run_folder(args.out, invconv, args.seeds[0]), "samples.png"))
              for invconv in args.invconv]
    width, height = panels[0].size
    canvas = Image.new("RGB", (len(panels) * (width + 10), height + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (invconv, panel) in enumerate(zip(args.invconv, panels)):
        canvas.paste(panel.convert("RGB"), (index * (width + 10), 24))
        draw.text((index * (width + 10) + 4, 5), f"{invconv}, T = 0.7", fill="black")
    canvas.save(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invconv", nargs="+", default=list(STEP_KINDS), choices=STEP_KINDS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="K, steps per level (default 8)")
    parser.add_argument("--hidden", type=int, default=64, help="coupling width (default 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpu-budget", type=float, default=360.0,
                        help="CPU seconds of training per run, the equal-time budget (default 360)")
    parser.add_argument("--equal-steps", type=int, default=1500,
                        help="the equal-steps budget (default 1500)")
    parser.add_argument("--curve-every", type=int, default=100)
    parser.add_argument("--eval-subset", type=int, default=1000,
                        help="test images of the learning curves (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="sampling calls, best kept")
    parser.add_argument("--parallel", type=int, default=2, help="training processes at a time")
    parser.add_argument("--data-dir", help="Fashion-MNIST's folder (default: as train.run)")
    parser.add_argument("--out", default=os.path.join("runs", "fashion"))
    parser.add_argument("--figures", default="docs", help="folder of the figures and table")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--skip-training", action="store_true",
                        help="measure and report the models already trained (without it, only "
                             "the models with no result.json yet are trained)")
    parser.add_argument("--train-worker", metavar="INVCONV", help=argparse.SUPPRESS)
    parser.add_argument("--measure-worker", metavar="INVCONV", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.train_worker or args.measure_worker:
        args.invconv = args.train_worker or args.measure_worker
        return train_worker(args) if args.train_worker else measure_worker(args)
    if not args.report_only:
        pairs = [(invconv, seed) for seed in args.seeds for invconv in args.invconv]
        if not args.skip_training:       # a model already trained (its result.json) is kept
            untrained = [pair for pair in pairs if not os.path.isfile(
                os.path.join(run_folder(args.out, *pair), "result.json"))]
            run_workers([worker_command(args, "train", *pair) for pair in untrained], args.parallel)
        run_workers([worker_command(args, "measure", *pair) for pair in pairs], 1)
    report(args)


if __name__ == "__main__":
    sys.exit(main())
