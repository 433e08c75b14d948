"""Small numeric helpers. One of them is wrong: the tests say which."""


def mean(values):
    """Arithmetic mean of a non-empty sequence."""
    return sum(values) / len(values)


def median(values):
    """Middle value of a non-empty sequence (mean of the two middle ones for even lengths)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    # Bug: the two middle values are ordered[mid - 1] and ordered[mid].
    return (ordered[mid] + ordered[mid + 1]) / 2


def clamp(x, lo, hi):
    """x limited to [lo, hi]."""
    return max(lo, min(x, hi))
