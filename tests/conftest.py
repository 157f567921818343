"""Hypothesis profiles shared by the whole test suite.

``ci``: every property runs at least 100 derandomized examples with no deadline (the README's test command
sets ``HYPOTHESIS_PROFILE=ci``; a ``CI`` environment variable selects it too). ``dev``: 25 examples, for a
quick local loop. Any other registered profile can be picked with ``HYPOTHESIS_PROFILE=<name>``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=25)

if os.environ.get("CI") or os.environ.get("HYPOTHESIS_PROFILE") == "ci":
    settings.load_profile("ci")
else:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "dev")
