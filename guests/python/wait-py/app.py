"""WAIT, written in Python: the twin of guests/wait (Rust).

Holds the pipeline for `duration` seconds (option, default 10). The start
time is kept in stage metadata, so a stage re-run after an agent restart
waits only for what is left. Needs no grants. Built by the Makefile with
componentize-py against ../../../wit, world `executor`.
"""

import json
import time

from wit_world import exports
from wit_world.exports import execution, stages
from wit_world.imports import log, metadata, types

# The longest wait: 30 days (longer is a typo).
MAX_SECONDS = 30 * 24 * 3600

START_KEY = "wait.start-unix-ms"


def finish(status, message=""):
    return execution.StageResult(status=status, message=message)


def now_ms():
    return int(time.time() * 1000)


class Stages(exports.Stages):
    def defined_stages(self):
        return [stages.StageDefinition(name="WAIT", description="Wait for a duration; survives agent restarts (Python)")]


class Execution(exports.Execution):
    def execute_stage(self, request):
        try:
            options = json.loads(request.stage.options)
        except ValueError as e:
            return finish(types.StageStatus.FAILURE, f"invalid WAIT options: {e}")
        unknown = sorted(set(options) - {"duration"})
        if unknown:
            return finish(types.StageStatus.FAILURE, f"invalid WAIT options: unknown field `{unknown[0]}`, expected `duration`")
        duration = options.get("duration", 10.0)
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 <= duration <= MAX_SECONDS:
            return finish(types.StageStatus.FAILURE, f"invalid WAIT options: duration must be a number of seconds from 0 to {MAX_SECONDS} (30 days), not {duration}")
        stored = metadata.get(metadata.Scope.STAGE, START_KEY)
        if stored is not None and stored.isdigit():
            start = int(stored)
            log.write(log.Level.INFO, f"resuming a wait that started at {start} (unix ms)")
        else:
            start = now_ms()
            try:
                metadata.put(metadata.Scope.STAGE, START_KEY, str(start))
            except Exception as e:  # the host answered an error
                return finish(types.StageStatus.FAILURE, f"cannot record the start time: {e}")
        end = start + int(duration * 1000)
        log.write(log.Level.INFO, f"waiting {float(duration):.1f}s")
        while True:
            left = end - now_ms()
            if left <= 0:
                break
            time.sleep(min(left, 5000) / 1000)
            if end > now_ms():
                log.write(log.Level.INFO, f"{(end - now_ms()) / 1000:.0f}s left")
        log.write(log.Level.INFO, "wait finished")
        return finish(types.StageStatus.SUCCESS)
