"""Run by every rank of ``mpiexec -n N python tests/distributed_worker.py`` (tests/test_distributed.py).

Each rank trains a small flow twice: as ONE process on the whole global batch (the reference,
computed by every rank alone), and as its share of the N-rank job (its rows of each batch, one
gradient Allreduce per step). It then compares, and rank 0 prints one JSON line with the
measured differences. Any failed expectation raises, which ends the job (abort_on_error).
"""
import json
import sys

import numpy as np

from data import load_dataset, preprocess_rows
from nfcore.flow import Flow
from nfcore.layers import ActNorm, NonFiniteError
from nfcore.optim import Adam
from train.distributed import (Communicator, GradientAllreduce, abort_on_error, distributed_loss_and_backward,
                               evaluate_bits_per_dim, initialize_actnorms, parameter_digest)
from train.session import evaluate_bits_per_dim as evaluate_one_process

N_BITS, BATCH, STEPS, SEED = 4, 32, 10, 0     # 32 rows: slices of 10, 11, 11 for N = 3
WARMUP = 200                                 # train.run's default for digits


def global_batch(images, step):
    """The whole batch of ``step`` as one process draws it: rows of a seeded permutation,
    noise default_rng([SEED, 1, step])."""
    order = np.random.default_rng([SEED, 0, 0]).permutation(len(images))
    return images[order[step * BATCH:(step + 1) * BATCH]]


def new_flow():
    return Flow((1, 8, 8), levels=2, steps=2, hidden=16, seed=SEED)


def new_optimizer(flow):
    return Adam(flow.layers, lr=1e-3, warmup_steps=WARMUP, max_grad_norm=50.0)


def parameters(flow):
    return [p.copy() for layer in flow.layers for p in layer.params.values()]


def gradients(flow):
    return [layer.grads[name].copy() for layer in flow.layers for name in layer.params]


def relative(a, b):
    """‖a − b‖ / ‖b‖ over the concatenation of all arrays."""
    a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main():
    communicator = Communicator()
    with abort_on_error(communicator):
        train_images, test_images = load_dataset("digits")
        lo, hi = communicator.rows(BATCH)

        # one process, whole batches
        reference = new_flow()
        first = preprocess_rows(global_batch(train_images, 0), N_BITS, [SEED, 1, 0], 0)
        reference.forward(first)
        reference_init = parameters(reference)
        optimizer = new_optimizer(reference)
        reference_losses = []
        for step in range(STEPS):
            x = preprocess_rows(global_batch(train_images, step), N_BITS, [SEED, 1, step], 0)
            optimizer.zero_grad()
            reference_losses.append(reference.loss_and_backward(x, N_BITS)[0])
            if step == 0:
                reference_gradient = gradients(reference)
            optimizer.step()

        # this rank's share of the job: its rows, their noise only
        flow = new_flow()
        initialize_actnorms(flow, communicator,
                            preprocess_rows(global_batch(train_images, 0)[lo:hi], N_BITS, [SEED, 1, 0], lo))
        assert all(layer.initialized for layer in flow.layers if isinstance(layer, ActNorm))
        init_difference = relative(parameters(flow), reference_init)
        optimizer = new_optimizer(flow)
        reducer = GradientAllreduce(flow.layers, communicator)
        losses = []
        for step in range(STEPS):
            x = preprocess_rows(global_batch(train_images, step)[lo:hi], N_BITS, [SEED, 1, step], lo)
            assert np.array_equal(x, preprocess_rows(global_batch(train_images, step), N_BITS,
                                                     [SEED, 1, step], 0)[lo:hi])
            optimizer.zero_grad()
            losses.append(distributed_loss_and_backward(flow, x, N_BITS, BATCH, reducer))
            if step == 0:
                gradient_difference = relative(gradients(flow), reference_gradient)
            optimizer.step()
        communicator.check_same("parameters after training", parameter_digest(flow.layers))

        # a NaN in the last rank's rows: every rank skips the step together, nothing changes
        before = parameter_digest(flow.layers)
        x = preprocess_rows(global_batch(train_images, STEPS)[lo:hi], N_BITS, [SEED, 1, STEPS], lo)
        if communicator.rank == communicator.size - 1:
            x[0, 0, 0, 0] = np.nan
        optimizer.zero_grad()
        try:
            distributed_loss_and_backward(flow, x, N_BITS, BATCH, reducer)
            skipped = False
        except NonFiniteError:
            skipped = True
        assert skipped and parameter_digest(flow.layers) == before

        test = test_images[:100]
        bpd = evaluate_bits_per_dim(flow, test, N_BITS, BATCH, SEED, communicator)
        bpd_one_process = evaluate_one_process(flow, test, N_BITS, BATCH, SEED)

        per_tensor = [float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                      for a, b in zip(parameters(flow), parameters(reference))]
        result = {"ranks": communicator.size, "rows": [lo, hi],
                  "actnorm_init_relative": init_difference,
                  "gradient_relative": gradient_difference,
                  "parameters_relative": relative(parameters(flow), parameters(reference)),
                  "worst_tensor_relative": max(per_tensor),
                  "loss_relative": max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses)),
                  "eval_relative": abs(bpd - bpd_one_process) / abs(bpd_one_process),
                  "allreduce_s": reducer.take_seconds()}
        if communicator.is_root:
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
