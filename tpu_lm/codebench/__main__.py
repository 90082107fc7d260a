"""python -m tpu_lm.codebench (or tpu-lm codebench): the offline code benchmark's pass@k on a run; the command is
tpu_lm/cli/codebench.py. (A package's __main__, as tpu_lm/interpret's: a tpu_lm/codebench.py beside this
package would never be found, the package shadows it.)"""

from tpu_lm import cli

cli.start("codebench")
