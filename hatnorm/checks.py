"""Input checks for the authors of architectures: the ones hatnorm's own models run in their forwards.

Each raises where bad input enters, with a message that names the argument, the value given and what is
allowed, before any state is touched (see docs/reliability.md). A registered architecture calls them at
the top of its ``forward``::

    def forward(self, x, task, s=None):
        x = check_batch(x, (self.in_channels, "H", "W"), like=self.conv1.weight)
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        check_batch_statistics(x, positions=None, training=self.training)
"""

from hatnorm._checks import (
    MAX_TASKS,
    check_batch,
    check_batch_statistics,
    check_flat_batch,
    check_num_tasks,
    check_positive,
    check_positive_int,
    check_task,
    check_task_and_scale,
    check_training_scale,
)

__all__ = [
    "MAX_TASKS",
    "check_batch",
    "check_batch_statistics",
    "check_flat_batch",
    "check_num_tasks",
    "check_positive",
    "check_positive_int",
    "check_task",
    "check_task_and_scale",
    "check_training_scale",
]
