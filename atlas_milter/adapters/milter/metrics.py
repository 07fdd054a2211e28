"""Owns the milter's metric names (timers and counters, as they reach StatsD and the
/performance page) and the kinds of failure they count, named once so grep finds every use."""

STAGE_MILTER_EOM = "milter.eom"  # the end-of-message callback: classify, decide, reply
STAGE_MILTER_MESSAGE = "milter.message"  # all callback time spent on one message
COUNTER_MESSAGES = "milter.messages"
COUNTER_SKIP_PREFIX = "milter.skip."  # + authenticated | trusted_network | allow_listed
COUNTER_DENY_LISTED = "milter.deny_listed"
COUNTER_ERROR_PREFIX = "milter.error."  # + classify | timeout | busy | model | internal
COUNTER_ACTION_PREFIX = "milter.action."  # + the action taken
COUNTER_MIXED = "milter.mixed_recipients"
COUNTER_FORGED = "milter.forged_headers_removed"
COUNTER_TRUNCATED = "milter.truncated"
COUNTER_RECORD_REFUSED = "milter.record_refused"

ERR_CLASSIFY = "classify"
ERR_TIMEOUT = "timeout"
ERR_BUSY = "busy"
ERR_MODEL = "model"
ERR_INTERNAL = "internal"
