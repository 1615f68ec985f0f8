"""A bounded stack with a small, explicit interface."""


class StackFull(Exception):
    """Raised when pushing onto a stack that is already at capacity."""


class StackEmpty(Exception):
    """Raised when popping from or peeking at an empty stack."""


class BoundedStack:
    """A last-in, first-out container that holds at most `capacity` items."""

    def __init__(self, capacity):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, but got {capacity!r}")
        self._capacity = capacity
        self._items = []

    def push(self, item):
        """Pushes `item` onto the top of the stack."""
        if len(self._items) >= self._capacity:
            raise StackFull(f"stack is full ({self._capacity} items)")
        self._items.append(item)

    def pop(self):
        """Removes and returns the top item."""
        if not self._items:
            raise StackEmpty("pop from an empty stack")
        return self._items.pop()

    def peek(self):
        """Returns the top item without removing it."""
        if not self._items:
            raise StackEmpty("peek at an empty stack")
        return self._items[-1]

    def __len__(self):
        return len(self._items)

    def __bool__(self):
        return bool(self._items)

    def __repr__(self):
        return f"BoundedStack(capacity={self._capacity}, items={self._items!r})"


def balanced(text, pairs={"(": ")", "[": "]", "{": "}"}):
    """True when every bracket in `text` is closed in the right order."""
    stack = BoundedStack(max(1, len(text)))
    closers = set(pairs.values())
    for ch in text:
        if ch in pairs:
            stack.push(pairs[ch])
        elif ch in closers:
            if not stack or stack.pop() != ch:
                return False
    return not stack
