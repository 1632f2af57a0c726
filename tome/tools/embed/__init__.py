"""``tome embed``: the embedding job (:mod:`~tome.tools.embed.job`), its inputs, model, local and
Ray runners, and its output file."""
