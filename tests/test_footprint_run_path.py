"""What a plain proxy run loads, beyond ``import asyncio`` (issue 21: start and memory at the floor).

A run with the reference log format, no settings file, no HTTPS proxy and no rejected
token loads neither json, datetime, the token advice nor the HTTP CONNECT client; each
loads when its feature is used. Figures: ``benchmarks/bench_footprint.py``.
"""

from __future__ import annotations

import datetime
import json
import random
import subprocess
import sys

from localproxy.ops.logs import local_stamp

PROBE = """
import sys
import localproxy.cli
localproxy.cli.defer_unused_imports()
from localproxy.ops.logs import setup_logging
import logging
setup_logging(0, sys.stderr)
logging.getLogger("localproxy.probe").info("a line in the reference format")
import localproxy.serve, localproxy.proxy.local_proxy
names = ("json", "datetime", "localproxy.tokens.advice", "localproxy.websocket.http_connect",
         "localproxy.emulator", "boto3", "cryptography")
loaded = [name for name in names if name in sys.modules]
from localproxy.config.settings_json import load_settings_json
from localproxy.ops.logs import JsonFormatter
record = logging.LogRecord("x", logging.INFO, "probe.py", 1, "json line", None, None)
JsonFormatter().format(record)
print(",".join(loaded) or "-")
print("json" in sys.modules, "datetime" in sys.modules)
"""


def test_a_plain_run_loads_only_what_it_uses() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded, after = done.stdout.splitlines()
    assert loaded == "-"
    assert after == "True True"  # the JSON log format loads them when used


def test_local_stamp_is_datetimes_format() -> None:
    rng = random.Random(21)
    moments = [rng.uniform(0, 4e9) for _ in range(20000)] + [1.9999995, 1.0000005, 1700000000.9999996, 0.0]
    for moment in moments:
        expected = datetime.datetime.fromtimestamp(moment).strftime("%Y-%m-%dT%H:%M:%S.%f")
        assert local_stamp(moment) == expected, moment
    assert json.dumps(local_stamp(0.5)).startswith('"19')
