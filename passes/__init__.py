"""Graph stages of slimfx: capture (model -> ModelGraph), selector resolution, and the passes.

Nothing is imported here on purpose: `import slimfx.passes` must not pull in torch for the
language tools. Import the modules: `from slimfx.passes.capture import capture`.
"""
