"""Front doors that translate a mail protocol into pipeline calls and verdicts back into
protocol actions: `milter` (Postfix / Sendmail). Adapters never import each other; the
core (pipeline, policy, store) decides, adapters only translate."""
