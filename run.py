r"""SimCLRv2 in Keras 3: pretrain, fine-tune, distill, evaluate, embed, predict.

  python run.py --mode=train_then_eval --train_mode=pretrain
  python run.py --flagfile=flags/cifar10_pretrain.cfg \
      --dataset=image_folder --data_dir=../shared/data/cifar10

The command line of `simclr_tf` (`simclr_tf/cli.py`, also `python -m
simclr_tf` and the installed `simclr-tf` command); `--helpfull` lists every
flag. Exit status: 0 done; 2 bad flags, data, exports or model_dir (one
line, before any model is built); 3 training stopped on a non-finite loss
or an unwritable checkpoint (one line); 143 stopped by SIGTERM after saving
a checkpoint (rerun the same command to continue).
"""

from simclr_tf.cli import entry_point

if __name__ == "__main__":
  entry_point()
