"""The network and what describes it: STU-Net's sizes, module, plan and number type.

``sizes`` (the sizes by name, without torch), ``network`` (the architecture), ``plan`` (how a
model wants its images prepared and its outputs read), ``precision`` (the type the
convolutions run in).
"""

__all__: list[str] = []
