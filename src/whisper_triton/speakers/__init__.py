"""Who spoke when: the speaker encoder (resemblyzer's weights in numpy), clustering (scikit-learn),
and the attribution of segments and words to speakers. Uses `pipeline/` (VAD regions, words) and
`contract/`; knows no HTTP."""
