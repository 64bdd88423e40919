#!/usr/bin/env python3
"""An external plugin written with the SDK: functions, then serve()."""

import asyncio

from sandboxer import sdk

_greeting = "Hello"


def init(config):
    global _greeting
    _greeting = config.get("greeting", _greeting)
    sdk.log("info", f"greeting is {_greeting!r}")


def greet(name):
    return f"{_greeting}, {name}!"


def add(a, b):
    return a + b


async def sleep(seconds):
    await asyncio.sleep(seconds)
    return seconds


if __name__ == "__main__":
    sdk.serve(name="external-python", version="1.0.0")
