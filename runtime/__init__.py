"""Runtime: CompiledModel (compiled.py), artifacts on disk (artifact.py), the compile report
(report.py). Nothing is imported here, so `import slimfx.runtime` stays light; import the
modules: `from slimfx.runtime.artifact import load`.
"""
