class Counter:
    def __init__(self):
        self.value = 0

    def add(self, by):
        self.value += by
        return self.value
