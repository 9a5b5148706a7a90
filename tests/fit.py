"""The short training runs the methods' resume and export tests share."""


def fit_digits(method, run, steps: int, resume: bool = False):
    """`method`'s Trainer on scikit-learn's digits at 8x8 (batch 8, a checkpoint every 2 steps, no periodic grids),
    fitted: (the trainer, its exported pipeline folder)."""
    from dstudio.distill.core.trainer import Trainer, TrainerConfig
    from dstudio.distill.data import digits8

    trainer = Trainer(method, TrainerConfig(steps=steps, batch_size=8, sample_every=100, checkpoint_every=2,
                                            grid_per_class=1), run, data=digits8(8))
    return trainer, trainer.fit(resume=resume)


def stopped_and_resumed(run, folder, steps: int = 4, stop: int = 2):
    """The trainer of `run(folder, steps, resume=...)` stopped at step `stop`, then resumed from its checkpoint to
    `steps` (to compare with the uninterrupted run)."""
    run(folder, stop)
    return run(folder, steps, resume=True)[0]
