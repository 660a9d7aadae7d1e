"""The network and how it is run: STU-Net's module, its last layer, its plan, its number type.

``network`` (the architecture), ``head`` (the 1x1 head and softmax streamed on the CPU),
``plan`` (how a model wants its images prepared and its outputs read), ``precision`` (the type
the convolutions run in).
"""

__all__: list[str] = []
