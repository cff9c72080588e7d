"""decon.py --decoder fcn --fcn-channels 512 --fcn-dilation 1 (DeCon with the FCN decoder on C5) against
the DeCon authors' code with decoder_type FCN and decoder_downstream_dataset ade20k (its
MMSeg_FCN_Decoder: two conv-BN-ReLU, 512 channels, dilation 1); everything else as vs_decon.py
(whose check this runs). The cityscapes setting (256 channels, dilation 6) differs in those two
numbers only; at the small images of a CPU check a dilation of 6 would reach past the C5 map.
"""
import vs_decon


def check(path, cli, table, notes):
    vs_decon.FCN = True
    vs_decon.KEEP_DEFECTS = KEEP_DEFECTS
    vs_decon.check(path, cli, table, notes)


KEEP_DEFECTS = False  # set by official.py --keep-defects
