"""decon.py --deep-supervision --skip-channel-dropout 0.5 (DeCon-ML: heads on P2-P5) against the DeCon
authors' code with decoder_deep_supervision and sk_channel_dropout_prob 0.5; everything else as
vs_decon.py (whose check this runs). The skip-connection dropout masks are drawn from the same
seeded generator on both sides, in the same order (student then teacher decoder, view 1 then 2,
C4 then C3 then C2 laterals).
"""
import vs_decon


def check(path, cli, table, notes):
    vs_decon.DEEP_SUPERVISION = True
    vs_decon.KEEP_DEFECTS = KEEP_DEFECTS
    vs_decon.check(path, cli, table, notes)


KEEP_DEFECTS = False  # set by official.py --keep-defects
