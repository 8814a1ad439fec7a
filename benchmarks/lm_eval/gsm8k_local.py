"""The splits of gsm8k_local.yaml: the file's first 5 problems are the few-shot examples, the
rest are evaluated (so no problem is shown with its own answer)."""

SHOTS = 5


def shot_docs(dataset):
    return dataset.select(range(SHOTS))


def eval_docs(dataset):
    return dataset.select(range(SHOTS, len(dataset)))
