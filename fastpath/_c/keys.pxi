# The keyed hashes of rules.Keys, with the reference's parameters (cg_blake2b.h, cg_siphash.h,
# cg_sha256.h): BLAKE2b states keyed once and copied per hash, no Python call per item.

cdef struct KeyStates:
    # Everything a decision hashes with, derived from the pepper once (Gate.__init__).
    cg_blake2b_state storage        # storage_key: BLAKE2b-128, person PERSON_STORE
    cg_blake2b_state tag            # beneficiary_tag: BLAKE2b-64, person PERSON_ATTEST
    unsigned char pseudonym_key[16]     # pseudonym: SipHash-2-4 of the storage key
    cg_hmac_sha256_key mac          # the attestation MAC, keyed with Keys.attestation_key
    # member_hash is salted per beneficiary: it is keyed afresh from the pepper every time.
    unsigned char pepper[64]
    size_t pepper_size


cdef int _init_keys(KeyStates* k, object keys, object attestation_key) except -1:
    """Fill `k` from a rules.Keys (and its attestation_key, already read)."""
    cdef bytes pepper = keys.pepper
    cdef bytes pseudonym_key
    cdef bytes mac_key
    k.pepper_size = len(pepper)
    memcpy(k.pepper, PyBytes_AS_STRING(pepper), k.pepper_size)
    _init_state(k, &k.storage, STORAGE_KEY_SIZE, rules.PERSON_STORE)
    pseudonym_key = keys.pseudonym_key
    memcpy(k.pseudonym_key, PyBytes_AS_STRING(pseudonym_key), 16)
    _init_state(k, &k.tag, BENEFICIARY_TAG_SIZE, rules.PERSON_ATTEST)
    mac_key = attestation_key
    cg_hmac_sha256_setkey(
        &k.mac,
        <const unsigned char*>PyBytes_AS_STRING(mac_key),
        PyBytes_GET_SIZE(mac_key),
    )
    return 0


cdef void _init_state(const KeyStates* k, cg_blake2b_state* s, size_t size, bytes person):
    cdef unsigned char personal[16]
    memset(personal, 0, 16)
    memcpy(personal, PyBytes_AS_STRING(person), PyBytes_GET_SIZE(person))
    cg_blake2b_init(s, size, k.pepper, k.pepper_size, NULL, personal)
    # Every hash of these states has data after the key: pre-compress the key block.
    cg_blake2b_absorb_key(s)


cdef inline void _hash(const cg_blake2b_state* keyed, const unsigned char* data,
                       size_t n, unsigned char* out) noexcept nogil:
    # n is IDENTITY_SIZE: one block, one compression from the pre-keyed state.
    cg_blake2b_short(keyed, data, n, out)


cdef inline void _storage_key(const KeyStates* k, const unsigned char* identity,
                              unsigned char* out) noexcept nogil:
    """rules.Keys.storage_key of a rules.identity_bytes (STORAGE_KEY_SIZE bytes)."""
    _hash(&k.storage, identity, IDENTITY_SIZE, out)


cdef inline void _pseudonym(const KeyStates* k, const unsigned char* storage_key,
                            unsigned char* out) noexcept nogil:
    """rules.Keys.pseudonym, from the storage key already computed (PSEUDONYM_SIZE bytes)."""
    cg_siphash24(k.pseudonym_key, storage_key, STORAGE_KEY_SIZE, out)


cdef inline void _beneficiary_tag(const KeyStates* k, const unsigned char* identity,
                                  unsigned char* out) noexcept nogil:
    """rules.Keys.beneficiary_tag (BENEFICIARY_TAG_SIZE bytes)."""
    _hash(&k.tag, identity, IDENTITY_SIZE, out)


cdef int _member_hash(const KeyStates* k, const unsigned char* storage_key,
                      const unsigned char* member, Py_ssize_t n,
                      unsigned char* out) except -1:
    """rules.Keys.member_hash of an ASCII member number (MEMBER_HASH_SIZE bytes)."""
    cdef unsigned char personal[16]
    cdef cg_blake2b_state s
    memset(personal, 0, 16)
    memcpy(personal, PyBytes_AS_STRING(rules.PERSON_MEMBER),
           PyBytes_GET_SIZE(rules.PERSON_MEMBER))
    cg_blake2b_init(&s, MEMBER_HASH_SIZE, k.pepper, k.pepper_size, storage_key, personal)
    cg_blake2b_update(&s, member, n)
    cg_blake2b_final(&s, out)
    return 0
