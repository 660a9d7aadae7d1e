"""What the structures are: the label table (names, groups, sides) and their display colours.

``labels`` (the 104 structures of the published models in channel order, and the names of a
fine-tuned model's own classes), ``colors`` (one colour per label, the same in every output).
"""

__all__: list[str] = []
