"""The HBT paper's figures (Elmahdy et al., arXiv 2408.10536, Tables 1-2), beside a study's.

The paper fine-tuned XLM-R and LaBSE on a translated corpus, one run per cell; a study here
fine-tunes another model on other data. Levels therefore do not compare, but the claims are
about differences between batch types, and those can be set side by side: hybrid - X-X,
hybrid - X-Y and X-Y - X-X, in mAP points and in language bias.
"""
PAPER = "paper (arXiv 2408.10536, one run per cell)"
SETTINGS = ("mo_map", "cr_map", "mul_map", "bias")

# evaluation set -> init -> batch type -> (Mo. mAP, Cr. mAP, Mul. mAP, bias)
FIGURES = {
    "xquad-r": {
        "XLM-R": {"xx": (.792, .674, .547, 410.2), "xy": (.755, .700, .593, 295.4), "hybrid": (.798, .705, .593, 286.6)},
        "LaBSE": {"xx": (.808, .752, .652, 261.5), "xy": (.801, .762, .679, 225.2), "hybrid": (.817, .767, .682, 221.1)},
    },
    "mlqa-r": {
        "XLM-R": {"xx": (.648, .584, .473, 287.5), "xy": (.626, .620, .508, 226.7), "hybrid": (.648, .623, .512, 227.1)},
        "LaBSE": {"xx": (.681, .656, .550, 225.3), "xy": (.671, .677, .576, 198.3), "hybrid": (.686, .681, .579, 195.0)},
    },
}
DIFFERENCES = (("hybrid", "xx"), ("hybrid", "xy"), ("xy", "xx"))


def figures_for(eval_path):
    """The paper's figures for an evaluation set named like ours (xquad-r, mlqa-r), else None."""
    return FIGURES.get(eval_path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower())


def paper_difference(figures, a, b, metric):
    """A - B in the paper for one init's figures (a dict batch type -> 4-tuple)."""
    i = SETTINGS.index(metric)
    return figures[a][i] - figures[b][i]
