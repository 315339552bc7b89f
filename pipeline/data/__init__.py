"""The data path: shard sets (``shards``, ``tarstream``, ``sources``), the streaming loader (``loader``) and its resume (``resume``), per-sample seeding (``seeding``)."""
