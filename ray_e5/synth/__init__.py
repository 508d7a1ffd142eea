"""The generate stage's former package name, kept only so that ``python -m ray_e5.synth.testserver`` (the path
earlier releases documented for the fault-injecting test server) keeps working. The code is in :mod:`ray_e5.generate`."""
