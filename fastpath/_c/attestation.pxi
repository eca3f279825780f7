# The attestation of a COVERED answer: rules.encode_attestation's token (an HMAC-SHA256 over a
# packed payload, base64url), built in C when every value fits its field.

cdef const char* _B64URL = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)


cdef int _put_attestation(Buf* out, const cg_hmac_sha256_key* mac_key, object attestation_key,
                          object expires, const Request* r, object care_date,
                          object practitioner_id, const unsigned char* tag) except -1:
    """The `attestation` field: rules.encode_attestation(attestation_key, expires=, domain=,
    care_date=, amc_number=, practitioner_id=, beneficiary_tag=tag), with the domain and AMC
    of `r`. Built here when every value fits its field; otherwise rules.encode_attestation
    itself runs (and raises as it does)."""
    cdef unsigned char payload[MAX_ATTESTATION_PAYLOAD + ATTESTATION_MAC_SIZE]
    cdef unsigned char mac[32]
    cdef Py_ssize_t size, pid_size, amc_size, token_size
    cdef const char* pid
    cdef const char* token
    cdef long long expires_c = -1
    cdef long long care_c = -1
    if PyLong_CheckExact(expires):
        expires_c = _clamped(expires)
    if PyLong_CheckExact(care_date):
        care_c = _clamped(care_date)
    if not (
        0 <= expires_c <= UINT32_MAX
        and 0 <= care_c <= UINT32_MAX
        and type(practitioner_id) is str
        and PyUnicode_IS_ASCII(practitioner_id)
        and PyUnicode_GET_LENGTH(practitioner_id) <= 255
    ):
        token_str = rules.encode_attestation(
            attestation_key,
            expires=expires,
            domain=r.domain,
            care_date=care_date,
            amc_number=PyUnicode_DecodeASCII(
                <const char*>r.text[F_AMC_NUMBER], r.size[F_AMC_NUMBER], NULL
            ),
            practitioner_id=practitioner_id,
            beneficiary_tag=PyBytes_FromStringAndSize(<const char*>tag,
                                                      BENEFICIARY_TAG_SIZE),
        )
        token = PyUnicode_AsUTF8AndSize(token_str, &token_size)
        return _put_len_field(out, TAG_ATTESTATION, token, token_size)

    # u8 version, u32 expires, u8 domain, u32 care date, u8 + amc, u8 + practitioner
    # id, beneficiary tag; all big-endian (rules._ATT_HEAD).
    pid = PyUnicode_AsUTF8AndSize(practitioner_id, &pid_size)
    amc_size = r.size[F_AMC_NUMBER]
    payload[0] = ATTESTATION_VERSION
    _put_u32be(payload + 1, expires_c)
    payload[5] = <unsigned char>r.domain
    _put_u32be(payload + 6, care_c)
    payload[10] = <unsigned char>amc_size
    memcpy(payload + 11, r.text[F_AMC_NUMBER], amc_size)
    size = 11 + amc_size
    payload[size] = <unsigned char>pid_size
    memcpy(payload + size + 1, pid, pid_size)
    size += 1 + pid_size
    memcpy(payload + size, tag, BENEFICIARY_TAG_SIZE)
    size += BENEFICIARY_TAG_SIZE

    cg_hmac_sha256(mac_key, payload, size, mac)
    memcpy(payload + size, mac, ATTESTATION_MAC_SIZE)
    size += ATTESTATION_MAC_SIZE

    token_size = (size * 4 + 2) // 3
    _reserve(out, 11 + token_size)
    out.data[out.size] = TAG_ATTESTATION
    out.size += 1
    _put_varint_unchecked(out, <unsigned long long>token_size)
    out.size += _b64url(payload, size, out.data + out.size)
    return 0


cdef Py_ssize_t _b64url(const unsigned char* src, Py_ssize_t n,
                        unsigned char* dst) noexcept nogil:
    """base64url without padding: urlsafe_b64encode(src).rstrip(b"=")."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j = 0
    cdef unsigned int v
    while i + 3 <= n:
        v = (<unsigned int>src[i] << 16) | (<unsigned int>src[i + 1] << 8) | src[i + 2]
        dst[j] = _B64URL[v >> 18]
        dst[j + 1] = _B64URL[(v >> 12) & 63]
        dst[j + 2] = _B64URL[(v >> 6) & 63]
        dst[j + 3] = _B64URL[v & 63]
        i += 3
        j += 4
    if n - i == 1:
        v = <unsigned int>src[i] << 16
        dst[j] = _B64URL[v >> 18]
        dst[j + 1] = _B64URL[(v >> 12) & 63]
        j += 2
    elif n - i == 2:
        v = (<unsigned int>src[i] << 16) | (<unsigned int>src[i + 1] << 8)
        dst[j] = _B64URL[v >> 18]
        dst[j + 1] = _B64URL[(v >> 12) & 63]
        dst[j + 2] = _B64URL[(v >> 6) & 63]
        j += 3
    return j


cdef inline void _put_u32be(unsigned char* p, long long v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v
