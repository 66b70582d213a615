"""Stage 4, selection: statistics -> scores -> top-K or budgeted masks, and the `select` job end to end."""
