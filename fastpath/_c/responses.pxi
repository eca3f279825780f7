# The CheckCoverageResponse fields: an answer (all but its attestation, which attestation.pxi
# appends) and a refusal carried in `error`, field for field as upb serializes the reference's.

cdef int _put_answer(Buf* out, const Request* r, int found, const Right* best) except -1:
    """The answer to a validated request, from what _match_rights found: the request_id, the
    decision and, when COVERED, the rate, convention and end date of the `best` row. A COVERED
    answer then takes its attestation (attestation.pxi)."""
    if r.size[F_REQUEST_ID]:
        _put_len_field(out, TAG_REQUEST_ID, r.text[F_REQUEST_ID],
                       r.size[F_REQUEST_ID])
    if found == MATCH_NONE:
        return _put_varint_field(out, TAG_DECISION, DECISION_NO_MATCH)
    if found == MATCH_CLOSED:
        return _put_varint_field(out, TAG_DECISION, DECISION_NOT_COVERED)
    _put_varint_field(out, TAG_DECISION, DECISION_COVERED)
    if best.rate_percent:
        _put_varint_field(out, TAG_RATE_PERCENT, best.rate_percent)
    if best.convention_size:
        _put_len_field(out, TAG_CONVENTION_TYPE, best.convention,
                       best.convention_size)
    return _put_rights_end_date(out, best.end)


cdef int _put_rights_end_date(Buf* out, long long end) except -1:
    """f"{end:08d}" of a u32."""
    cdef unsigned char digits[20]
    cdef int i = 20
    while end or i > 12:
        i -= 1
        digits[i] = <unsigned char>(48 + end % 10)
        end //= 10
    return _put_len_field(out, TAG_RIGHTS_END_DATE, digits + i, 20 - i)


cdef int _put_refusal(Buf* out, const Request* r, bytes status) except -1:
    """A CheckCoverageResponse with `status` in `error`. As in the reference, the
    request_id is echoed when the request was read and its request_id is valid."""
    if r != NULL and r.size[F_REQUEST_ID] and _valid_request_id(r):
        _put_len_field(out, TAG_REQUEST_ID, r.text[F_REQUEST_ID],
                       r.size[F_REQUEST_ID])
    return _put_len_field(out, TAG_ERROR, PyBytes_AS_STRING(status),
                          PyBytes_GET_SIZE(status))
