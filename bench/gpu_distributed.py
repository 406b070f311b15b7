"""The distributed GPU path on one GPU: 5 steps of ``mpiexec -n 1 python -m train.run
--distributed --backend gpu`` against the same 5 steps of ``python -m train.run --backend cpu``.

    python bench/gpu_distributed.py OUT_DIR                 # needs a GPU, CuPy with NCCL, MPI
    python bench/gpu_distributed.py OUT_DIR --against cpu   # a rehearsal: --distributed on the CPU

What it exercises that nothing else does without several GPUs: the Communicator's GPU set-up
(the local rank's GPU, the NCCL unique id broadcast over MPI, the NCCL communicator) and one
NCCL Allreduce of the gradient buffer per step (train/distributed.py runs it on one rank too);
bench/gpu_train.py (gpu_check.sh part e) runs --backend gpu without --distributed.

The model is small (digits, L=2, K=2, hidden 16, batch 32, no warm-up, seed 0) and both runs evaluate the
whole digits test set after every step (--eval-every 1): the test bits/dim of steps 1 to 5 and
the train bits/dim of the 5 steps are compared, each to TOLERANCE = 1e-4 relative. The reason
for 1e-4 is bench/gpu_train.py's: the two devices round differently and training carries the
differences along (a 1e-7 relative change moves the next 20 losses by at most 4.2e-8 relative,
measured on the CPU), so 1e-4 leaves a wide margin for rounding and little room for a wrong
gradient: with --warmup 0, each of the 5 Adam steps (lr 1e-3) moves the test bits/dim by 0.027
to 0.041, 6e-3 to 9e-3 relative (measured on the CPU), 60 to 90 times the tolerance.
The distributed run must also log allreduce_s, the seconds of its Allreduce: proof that it ran
the distributed step. Exit status 1 if anything disagrees or a run fails.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
TOLERANCE = 1e-4
SMALL = ["-m", "train.run", "--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden",
         "16", "--batch-size", "32", "--max-steps", str(STEPS), "--eval-every", "1",
         "--sample-every", "1000", "--warmup", "0", "--seed", "0"]


def mpiexec():
    """The mpiexec beside this Python (a virtual environment's MPICH wheel), else on the PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file if line.strip()]


def per_step(records):
    """{what: bits/dim}: "test, step s" for every evaluation, "train, steps 1-N" for the
    logged mean of the training losses."""
    values = {f"test, step {r['step']}": r["test_bpd"] for r in records if "test_bpd" in r}
    values.update({f"train, steps 1-{r['step']}": r["train_bpd"] for r in records
                   if "train_bpd" in r})
    return values


def compare(reference, other, tolerance=TOLERANCE):
    """(rows, ok): one row (what, reference, other, relative difference, ok) per value of
    ``per_step(reference)``; ok when every value is present on both sides, 5 test values
    among them, and each within ``tolerance`` relative."""
    a, b = per_step(reference), per_step(other)
    rows, ok = [], len([key for key in a if key.startswith("test")]) == STEPS and a.keys() == b.keys()
    for key, value in a.items():
        if key not in b:
            rows.append((key, value, None, None, False))
            continue
        difference = abs(b[key] - value) / abs(value)
        rows.append((key, value, b[key], difference, difference <= tolerance))
        ok &= difference <= tolerance
    return rows, ok


def run(command, out, env):
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:] + result.stderr[-3000:], flush=True)
        raise SystemExit(f"error: the run in {out} failed with exit status {result.returncode}")
    return read_metrics(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for the two runs (made if missing)")
    parser.add_argument("--against", default="gpu", choices=("gpu", "cpu"),
                        help="the --distributed run's backend (default gpu; cpu: a rehearsal)")
    args = parser.parse_args(argv)
    launcher = mpiexec()
    if launcher is None:
        print("error: no mpiexec (pip install -e \".[mpi]\" brings MPICH's)", file=sys.stderr)
        return 1
    os.makedirs(args.out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cpu_out = os.path.join(args.out_dir, "cpu")
    dist_out = os.path.join(args.out_dir, f"distributed_{args.against}")
    for out in (cpu_out, dist_out):
        shutil.rmtree(out, ignore_errors=True)
    reference = run([sys.executable, *SMALL, "--backend", "cpu", "--out", cpu_out], cpu_out, env)
    other = run([launcher, "-n", "1", sys.executable, *SMALL, "--distributed", "--backend",
                 args.against, "--out", dist_out], dist_out, env)
    rows, ok = compare(reference, other)
    reduced = [r["allreduce_s"] for r in other if "allreduce_s" in r]
    print(f"\nbits/dim, --backend cpu against mpiexec -n 1 --distributed --backend "
          f"{args.against} (relative tolerance {TOLERANCE:.0e})")
    print(f"| what | cpu | distributed {args.against} | relative difference | result |")
    print("|---|---:|---:|---:|---|")
    for what, a, b, difference, good in rows:
        print(f"| {what} | {a:.6f} | {'missing' if b is None else f'{b:.6f}'} | "
              f"{'' if difference is None else f'{difference:.1e}'} | {'ok' if good else 'FAIL'} |")
    print(f"allreduce_s logged by the distributed run: {reduced}")
    if not reduced:
        print("error: the distributed run logged no allreduce_s", file=sys.stderr)
        return 1
    if not ok:
        print("error: the distributed run and the CPU run disagree (see FAIL above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
