"""Storage commitment (Push Model, PS3.4 Annex J): the messages (`messages`), what the
receiving side stores (`accept`), what is committed (`decide`), the reports (`reports`,
`reporter`) and, in relay mode, the requests to the destinations (`relay`)."""
