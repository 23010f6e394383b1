"""(being written) PEFT adapter directories read for `adapt … from="dir"`."""


def read(source, bound, ctx):
    raise NotImplementedError("adapt … from= is not implemented yet")
