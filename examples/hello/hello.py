"""The smallest python plugin: public functions are its methods, lifecycle is optional."""

_greeting = "Hello"


def init(config):
    global _greeting
    _greeting = config.get("greeting", _greeting)


def health_check():
    return True


def greet(name):
    return f"{_greeting}, {name}!"


def add(a, b):
    return a + b


def fail(message):
    raise ValueError(message)
