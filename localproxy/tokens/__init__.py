"""Access and client tokens: where they come from (given, file, generated), rotation on
a refusal, and the advice printed for each refusal (what happened, what to run).

May use configuration, ops and the bottom.
"""
