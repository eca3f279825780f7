# The rights file of `covergate import rights`, read in one pass over its bytes: CSV split,
# every field checked, storage keys and member hashes computed, rows encoded and grouped into
# the records rules.encode_record makes, sorted by storage key. The reference is
# service.importer.read_rights (then rules.encode_record per beneficiary).
#
# This reader only ever accepts: a file it takes must give the reference's records, byte for
# byte. Whatever it does not take on itself (an invalid row, a header not spelt exactly, bytes
# outside ASCII after a leading byte order mark, a quoted field left open at the end, too many
# rights for one beneficiary, no data row) makes it answer None, and the reference reads the
# file: it reports the problems, line by line, or imports the rare valid file declined here.
#
# Why the CSV split can be simple and still be Python's (csv.reader, excel dialect, not strict,
# on a file opened with newline=""): every column accepts ASCII letters and digits only, at most
# MAX_RIGHTS_FIELD of them. So a field holding a quote, a line break, any other byte, or more
# bytes than that is an invalid row, whatever the rest; a row of an accepted file is one
# physical line, and its fields are what is between the commas, a field's quotes taken off
# (`"ab"c` is `abc` to Python too).

from libc.stdlib cimport qsort

cdef enum:
    RIGHTS_COLUMNS = 11
    MAX_RIGHTS_FIELD = 20           # the longest value any column takes (member_number)
    MAX_CONVENTION_TYPE = 16
    MAX_RECORD_ROWS = 65535         # the record's u16 row count
    ROW_MAX_SIZE = ROW_HEAD_SIZE + MAX_AMC_NUMBER + 1 + MAX_CONVENTION_TYPE + MEMBER_HASH_SIZE
    MAX_DOMAIN_CODES = 16
    MEMBER_CACHE = 8                # member numbers hashed per beneficiary, kept for its next rows
    PROGRESS_STEP = 1 << 22         # bytes between two calls of the progress callback
    # the columns, in service.importer.RIGHTS_COLUMNS order
    C_NIR = 0
    C_NIR_KEY = 1
    C_BIRTH_DATE = 2
    C_BIRTH_RANK = 3
    C_AMC = 4
    C_MEMBER = 5
    C_DOMAIN = 6
    C_RATE = 7
    C_CONVENTION = 8
    C_START = 9
    C_END = 10

if rules.MAX_CONVENTION_TYPE != MAX_CONVENTION_TYPE or max(
    rules.MAX_AMC_NUMBER, rules.MAX_MEMBER_NUMBER, rules.MAX_CONVENTION_TYPE, NIR_SIZE
) != MAX_RIGHTS_FIELD or len(rules.DOMAIN_CODES) > MAX_DOMAIN_CODES:
    raise ImportError("fastpath._gate_c is out of date with the rights file's fields")


cdef struct Beneficiary:
    unsigned char key[STORAGE_KEY_SIZE]
    Py_ssize_t rows
    Py_ssize_t size                 # bytes of its encoded rows
    Py_ssize_t first_run            # its runs of consecutive rows, linked in file order
    Py_ssize_t last_run

cdef struct Run:
    Py_ssize_t offset               # in the row buffer
    Py_ssize_t size
    Py_ssize_t next                 # the beneficiary's next run, or -1

cdef struct RowFields:
    # a row's values, column by column (RIGHTS_COLUMNS order), and their lengths
    unsigned char text[RIGHTS_COLUMNS][MAX_RIGHTS_FIELD]
    Py_ssize_t size[RIGHTS_COLUMNS]

cdef struct KeyOrder:
    unsigned char key[STORAGE_KEY_SIZE]
    Py_ssize_t index


cdef int _key_order(const void* a, const void* b) noexcept nogil:
    return memcmp((<const KeyOrder*>a).key, (<const KeyOrder*>b).key, STORAGE_KEY_SIZE)


cdef int _grow_array(void** buffer, Py_ssize_t* capacity, Py_ssize_t used,
                     Py_ssize_t more, size_t item) except -1:
    """Room for `more` items after `used` in a PyMem buffer, doubling it as needed."""
    cdef Py_ssize_t want = used + more
    cdef Py_ssize_t size = capacity[0] if capacity[0] > 0 else 1024
    cdef void* grown
    if want <= capacity[0]:
        return 0
    while size < want:
        size *= 2
    grown = PyMem_Realloc(buffer[0], <size_t>size * item)
    if grown == NULL:
        raise MemoryError()
    buffer[0] = grown
    capacity[0] = size
    return 0


cdef class _RightsBuild:
    """What the reader accumulates, freed with it: the encoded rows in file order, the
    beneficiaries with their runs, and a hash table of storage keys (already uniform: a key's
    first 8 bytes index it)."""

    cdef unsigned char* rows
    cdef Py_ssize_t rows_used, rows_capacity
    cdef Beneficiary* people
    cdef Py_ssize_t people_used, people_capacity
    cdef Run* runs
    cdef Py_ssize_t runs_used, runs_capacity
    cdef Py_ssize_t* table          # index + 1 of a beneficiary, 0 for an empty entry
    cdef Py_ssize_t table_size      # a power of two

    def __dealloc__(self):
        PyMem_Free(self.rows)
        PyMem_Free(self.people)
        PyMem_Free(self.runs)
        PyMem_Free(self.table)

    cdef int _rehash(self, Py_ssize_t size) except -1:
        cdef Py_ssize_t* table = <Py_ssize_t*>PyMem_Realloc(NULL, <size_t>size * sizeof(Py_ssize_t))
        cdef Py_ssize_t i, at
        cdef uint64_t h
        if table == NULL:
            raise MemoryError()
        memset(table, 0, <size_t>size * sizeof(Py_ssize_t))
        for i in range(self.people_used):
            memcpy(&h, self.people[i].key, 8)
            at = <Py_ssize_t>(h & <uint64_t>(size - 1))
            while table[at]:
                at = (at + 1) & (size - 1)
            table[at] = i + 1
        PyMem_Free(self.table)
        self.table = table
        self.table_size = size
        return 0

    cdef Py_ssize_t beneficiary(self, const unsigned char* key) except -1:
        """The index of the beneficiary with this storage key, added when new."""
        cdef uint64_t h
        cdef Py_ssize_t at, i
        if (self.people_used + 1) * 2 > self.table_size:
            self._rehash(self.table_size * 2 if self.table_size else 1 << 16)
        memcpy(&h, key, 8)
        at = <Py_ssize_t>(h & <uint64_t>(self.table_size - 1))
        while self.table[at]:
            i = self.table[at] - 1
            if memcmp(self.people[i].key, key, STORAGE_KEY_SIZE) == 0:
                return i
            at = (at + 1) & (self.table_size - 1)
        _grow_array(<void**>&self.people, &self.people_capacity, self.people_used, 1,
                    sizeof(Beneficiary))
        i = self.people_used
        self.people_used += 1
        memcpy(self.people[i].key, key, STORAGE_KEY_SIZE)
        self.people[i].rows = 0
        self.people[i].size = 0
        self.people[i].first_run = -1
        self.people[i].last_run = -1
        self.table[at] = i + 1
        return i

    cdef int start_run(self, Py_ssize_t person) except -1:
        """A run of rows of `person` begins at the end of the row buffer."""
        cdef Beneficiary* b = &self.people[person]
        cdef Py_ssize_t r = self.runs_used
        _grow_array(<void**>&self.runs, &self.runs_capacity, self.runs_used, 1, sizeof(Run))
        self.runs_used += 1
        self.runs[r].offset = self.rows_used
        self.runs[r].size = 0
        self.runs[r].next = -1
        if b.last_run < 0:
            b.first_run = r
        else:
            self.runs[b.last_run].next = r
        b.last_run = r
        return 0

    cdef list records(self):
        """(storage key, record) for every beneficiary, sorted by key."""
        cdef KeyOrder* order = NULL
        cdef Py_ssize_t i, r, pos
        cdef Beneficiary* b
        cdef bytes key, value
        cdef unsigned char* out
        cdef list records = []
        if self.people_used == 0:
            return records
        order = <KeyOrder*>PyMem_Realloc(NULL, <size_t>self.people_used * sizeof(KeyOrder))
        if order == NULL:
            raise MemoryError()
        try:
            for i in range(self.people_used):
                memcpy(order[i].key, self.people[i].key, STORAGE_KEY_SIZE)
                order[i].index = i
            qsort(order, <size_t>self.people_used, sizeof(KeyOrder), _key_order)
            for i in range(self.people_used):
                b = &self.people[order[i].index]
                key = PyBytes_FromStringAndSize(<const char*>b.key, STORAGE_KEY_SIZE)
                value = PyBytes_FromStringAndSize(NULL, 3 + b.size)
                out = <unsigned char*>PyBytes_AS_STRING(value)
                out[0] = RECORD_VERSION
                out[1] = <unsigned char>(b.rows & 0xFF)
                out[2] = <unsigned char>(b.rows >> 8)
                pos = 3
                r = b.first_run
                while r >= 0:
                    memcpy(out + pos, self.rows + self.runs[r].offset, <size_t>self.runs[r].size)
                    pos += self.runs[r].size
                    r = self.runs[r].next
                records.append((key, value))
        finally:
            PyMem_Free(order)
        return records


cdef Py_ssize_t _csv_field(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos,
                           unsigned char* out, Py_ssize_t* size) noexcept nogil:
    """The field at `pos` as csv.reader reads it (excel dialect, not strict): its value in
    `out`, its length in `size`; returns the position of the comma, line break or end of data
    after it. -1 for a field no column takes (a quote or a line break in the value, or more
    than MAX_RIGHTS_FIELD bytes) and for a quote left open at the end of the data."""
    cdef Py_ssize_t m = 0
    cdef unsigned char c
    if pos < n and p[pos] == 34:                    # a quoted field
        pos += 1
        while True:
            if pos >= n:
                return -1
            c = p[pos]
            pos += 1
            if c == 34:
                break
            if c == 13 or c == 10 or m == MAX_RIGHTS_FIELD:
                return -1
            out[m] = c
            m += 1
        if pos < n and p[pos] == 34:                # "" is a quote in the value
            return -1
    while pos < n:                                  # unquoted, or after the closing quote
        c = p[pos]
        if c == 44 or c == 13 or c == 10:
            break
        if c == 34 or m == MAX_RIGHTS_FIELD:
            return -1
        out[m] = c
        m += 1
        pos += 1
    size[0] = m
    return pos


cdef inline bint _alnum(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """ASCII letters and digits only (str.isascii() and str.isalnum(), for n > 0)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122):
            return False
    return True


cdef struct DomainCodes:
    Py_ssize_t count
    unsigned char size[MAX_DOMAIN_CODES]
    unsigned char text[MAX_DOMAIN_CODES][MAX_RIGHTS_FIELD]
    unsigned char code[MAX_DOMAIN_CODES]


cdef int _domain_code(const DomainCodes* d, const unsigned char* s,
                      Py_ssize_t n) noexcept nogil:
    """rules.DOMAIN_CODES[s], or 0 when s is none of them."""
    cdef Py_ssize_t i
    for i in range(d.count):
        if d.size[i] == n and memcmp(d.text[i], s, <size_t>n) == 0:
            return d.code[i]
    return 0


cdef int _valid_right(const RowFields* r, const DomainCodes* domains,
                      unsigned char* nir) noexcept nogil:
    """The row's care domain code when it passes every check of service.importer
    (_check_identity, _check_right), else 0. Writes the normalised NIR."""
    cdef Py_ssize_t i, n
    cdef unsigned char c
    cdef int domain
    if r.size[C_NIR] != NIR_SIZE:
        return 0
    for i in range(NIR_SIZE):                       # rules.normalise_nir (ASCII: a-z only)
        c = r.text[C_NIR][i]
        if 97 <= c <= 122:
            c -= 32
        nir[i] = c
    if not _valid_nir(nir):
        return 0
    if (r.size[C_NIR_KEY] != 2 or not _all_digits(r.text[C_NIR_KEY], 2)
            or _number(r.text[C_NIR_KEY], 2) != _nir_key_for(nir)):
        return 0
    if not _valid_birth_date(r.text[C_BIRTH_DATE], r.size[C_BIRTH_DATE]):
        return 0
    if r.size[C_BIRTH_RANK] != 1 or not 49 <= r.text[C_BIRTH_RANK][0] <= 57:
        return 0
    n = r.size[C_AMC]
    if not 1 <= n <= MAX_AMC_NUMBER or not _all_digits(r.text[C_AMC], n):
        return 0
    if r.size[C_MEMBER] > MAX_MEMBER_NUMBER or not _alnum(r.text[C_MEMBER], r.size[C_MEMBER]):
        return 0
    domain = _domain_code(domains, r.text[C_DOMAIN], r.size[C_DOMAIN])
    if domain == 0:
        return 0
    n = r.size[C_RATE]
    if not 1 <= n <= 3 or not _all_digits(r.text[C_RATE], n) or _number(r.text[C_RATE], n) > 100:
        return 0
    n = r.size[C_CONVENTION]
    if not 1 <= n <= MAX_CONVENTION_TYPE or not _alnum(r.text[C_CONVENTION], n):
        return 0
    if not (_valid_calendar_date(r.text[C_START], r.size[C_START])
            and _valid_calendar_date(r.text[C_END], r.size[C_END])):
        return 0
    return domain if memcmp(r.text[C_START], r.text[C_END], 8) <= 0 else 0


cdef Py_ssize_t _rights_header(const unsigned char* p, Py_ssize_t n, bytes header) noexcept:
    """The position after the header line when it is exactly `header` (after a UTF-8 byte
    order mark, if any), else -1. The reference accepts more spellings (spaces, quotes):
    those files are the reference's to read."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t size = PyBytes_GET_SIZE(header)
    if n >= 3 and p[0] == 0xEF and p[1] == 0xBB and p[2] == 0xBF:
        pos = 3
    if n - pos < size or memcmp(p + pos, PyBytes_AS_STRING(header), <size_t>size) != 0:
        return -1
    pos += size
    if pos < n and p[pos] == 13:
        pos += 1
        if pos < n and p[pos] == 10:
            pos += 1
    elif pos < n and p[pos] == 10:
        pos += 1
    elif pos < n:
        return -1
    return pos


_RIGHTS_COLUMNS = (
    "nir", "nir_key", "birth_date", "birth_rank", "amc_number", "member_number", "domain",
    "rate_percent", "convention_type", "start_date", "end_date",
)


def rights_records(const unsigned char[::1] data, keys, columns, Py_ssize_t max_rights,
                   progress=None):
    """A rights file's records, as service.importer.read_rights_records makes them with the
    reference: (sorted [(storage key, record)], data rows). None when the reference must read
    the file (see the top of this file): every file it would refuse, and a few others.

    `data` is the whole file; `keys` a rules.Keys; `columns` the header's names (checked
    against the columns this reader knows); `max_rights` the most rows one beneficiary
    may have (service.importer.MAX_RIGHTS_PER_BENEFICIARY); `progress`, when given, is called
    with the bytes read since its last call."""
    cdef Py_ssize_t n = data.shape[0]
    cdef const unsigned char* p
    cdef KeyStates k
    cdef DomainCodes domains
    cdef _RightsBuild build = _RightsBuild()
    cdef RowFields r
    cdef unsigned char identity[IDENTITY_SIZE]
    cdef unsigned char last_identity[IDENTITY_SIZE]
    cdef unsigned char key[STORAGE_KEY_SIZE]
    cdef unsigned char members[MEMBER_CACHE][MAX_RIGHTS_FIELD]
    cdef Py_ssize_t member_size[MEMBER_CACHE]
    cdef unsigned char member_hashes[MEMBER_CACHE][MEMBER_HASH_SIZE]
    cdef Py_ssize_t cached = 0
    cdef Py_ssize_t pos, col, person = -1, rows = 0, reported = 0, m, i
    cdef Beneficiary* b
    cdef unsigned char* row
    cdef const unsigned char* mhash
    cdef unsigned char c
    cdef bint have_last = False
    cdef int domain
    cdef bytes name

    if tuple(columns) != _RIGHTS_COLUMNS:
        raise ValueError("fastpath._gate_c reads rights files of other columns")
    if not 1 <= max_rights <= MAX_RECORD_ROWS:
        raise ValueError("max_rights must be from 1 to 65535")
    if n == 0:
        return None
    p = &data[0]
    pos = _rights_header(p, n, ",".join(_RIGHTS_COLUMNS).encode("ascii"))
    if pos < 0:
        return None

    domains.count = 0
    for name_text, code in rules.DOMAIN_CODES.items():
        name = name_text.encode("ascii")
        if PyBytes_GET_SIZE(name) > MAX_RIGHTS_FIELD or not 1 <= code <= 255:
            raise ValueError("a care domain code this reader cannot hold")
        domains.size[domains.count] = <unsigned char>PyBytes_GET_SIZE(name)
        memcpy(domains.text[domains.count], PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        domains.code[domains.count] = <unsigned char>code
        domains.count += 1
    _init_keys(&k, keys, keys.attestation_key)
    _grow_array(<void**>&build.rows, &build.rows_capacity, 0, n // 2 + ROW_MAX_SIZE, 1)

    while pos < n:
        c = p[pos]
        if c == 13 or c == 10:                      # a blank line: no row
            pos += 1
            continue
        for col in range(RIGHTS_COLUMNS):
            pos = _csv_field(p, n, pos, r.text[col], &r.size[col])
            if pos < 0:
                return None
            if pos < n and p[pos] == 44:
                if col == RIGHTS_COLUMNS - 1:
                    return None                     # more fields than columns
                pos += 1
            elif col != RIGHTS_COLUMNS - 1:
                return None                         # fewer
        if pos < n and p[pos] == 13:                # the line break, \r\n being one
            pos += 1
            if pos < n and p[pos] == 10:
                pos += 1
        elif pos < n:
            pos += 1
        rows += 1

        domain = _valid_right(&r, &domains, identity)
        if domain == 0:
            return None
        memcpy(identity + NIR_SIZE, r.text[C_BIRTH_DATE], BIRTH_DATE_SIZE)
        identity[IDENTITY_SIZE - 1] = r.text[C_BIRTH_RANK][0]
        if not have_last or memcmp(identity, last_identity, IDENTITY_SIZE) != 0:
            _storage_key(&k, identity, key)
            person = build.beneficiary(key)
            build.start_run(person)
            memcpy(last_identity, identity, IDENTITY_SIZE)
            have_last = True
            cached = 0
        b = &build.people[person]
        if b.rows >= max_rights:
            return None
        mhash = NULL
        m = r.size[C_MEMBER]
        if m:
            for i in range(cached):
                if member_size[i] == m and memcmp(members[i], r.text[C_MEMBER], <size_t>m) == 0:
                    mhash = member_hashes[i]
                    break
            if mhash == NULL:
                i = cached if cached < MEMBER_CACHE else MEMBER_CACHE - 1
                _member_hash(&k, b.key, r.text[C_MEMBER], m, member_hashes[i])
                memcpy(members[i], r.text[C_MEMBER], <size_t>m)
                member_size[i] = m
                mhash = member_hashes[i]
                if cached < MEMBER_CACHE:
                    cached += 1

        # rules.encode_record's row: domain, rate, start, end, flags, AMC, convention, member
        _grow_array(<void**>&build.rows, &build.rows_capacity, build.rows_used, ROW_MAX_SIZE, 1)
        row = build.rows + build.rows_used
        row[0] = <unsigned char>domain
        row[1] = <unsigned char>_number(r.text[C_RATE], r.size[C_RATE])
        _put_u32le(row + 2, <uint32_t>_number(r.text[C_START], 8))
        _put_u32le(row + 6, <uint32_t>_number(r.text[C_END], 8))
        row[10] = FLAG_MEMBER if mhash != NULL else 0
        row[11] = <unsigned char>r.size[C_AMC]
        m = ROW_HEAD_SIZE
        memcpy(row + m, r.text[C_AMC], <size_t>r.size[C_AMC])
        m += r.size[C_AMC]
        row[m] = <unsigned char>r.size[C_CONVENTION]
        m += 1
        memcpy(row + m, r.text[C_CONVENTION], <size_t>r.size[C_CONVENTION])
        m += r.size[C_CONVENTION]
        if mhash != NULL:
            memcpy(row + m, mhash, MEMBER_HASH_SIZE)
            m += MEMBER_HASH_SIZE
        build.rows_used += m
        build.runs[b.last_run].size += m
        b.size += m
        b.rows += 1

        if progress is not None and pos - reported >= PROGRESS_STEP:
            progress(pos - reported)
            reported = pos
    if progress is not None and pos > reported:
        progress(pos - reported)
    if rows == 0:
        return None
    return build.records(), rows
