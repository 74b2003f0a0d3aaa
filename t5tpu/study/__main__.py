import sys

from t5tpu.study import main

main(sys.argv[1:])
