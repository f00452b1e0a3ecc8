"""``python -m megatron_attnedit.train`` for the tests, plus test-only objectives.

    train_worker.py [--nan-at N] --recipe R [--set ...]

``--nan-at N`` trains the ``lm_nan`` objective: plain lm whose loss turns NaN from step N on.
"""

import sys


def main():
    args = sys.argv[1:]
    if args and args[0] == "--nan-at":
        nan_at, args = int(args[1]), args[2:]
        from megatron_attnedit.training import objective

        class NaNAfter(objective.LMObjective):
            """lm, but the loss of every micro-batch from step ``nan_at`` on is NaN."""

            steps_seen = 0

            def forward_step(self, data_iterator, model):
                output, loss_func = super().forward_step(data_iterator, model)
                self.steps_seen += 1  # one micro-batch per step in the test

                def poisoned(t, at=self.steps_seen):
                    loss, n, metrics = loss_func(t)
                    return (loss * float("nan") if at >= nan_at else loss), n, metrics

                return output, poisoned

        objective.register("lm_nan", NaNAfter)
        args += ["--set", "objective.name=lm_nan"]
    from megatron_attnedit.train import main as train_main

    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
