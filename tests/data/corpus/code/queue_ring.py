"""A fixed-size ring buffer used as a first-in, first-out queue."""


class RingQueue:
    """Stores up to `size` items in a list that wraps around."""

    def __init__(self, size):
        self._slots = [None] * size
        self._head = 0
        self._count = 0

    def put(self, item):
        """Appends `item`; overwrites the oldest item when the queue is full."""
        tail = (self._head + self._count) % len(self._slots)
        self._slots[tail] = item
        if self._count == len(self._slots):
            self._head = (self._head + 1) % len(self._slots)
        else:
            self._count += 1

    def get(self):
        """Removes and returns the oldest item."""
        if self._count == 0:
            raise IndexError("get from an empty queue")
        item = self._slots[self._head]
        self._slots[self._head] = None
        self._head = (self._head + 1) % len(self._slots)
        self._count -= 1
        return item

    def __len__(self):
        return self._count


if __name__ == "__main__":
    q = RingQueue(3)
    for i in range(5):
        q.put(i)
    print([q.get() for _ in range(len(q))])  # [2, 3, 4]
