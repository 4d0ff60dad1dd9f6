package gcp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/ephemeral-secrets/csi-driver/pkg/provider"
)

// MaxValueBytes is the largest secret value read: Secret Manager's own
// limit on a version's payload (64 KiB). A larger answer is refused
// before it is buffered whole.
const MaxValueBytes = 64 << 10

// maxResponseBytes bounds an access response: the payload in base64 and
// the fields around it.
const maxResponseBytes = MaxValueBytes*4/3 + 4<<10

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// accessResponse is Secret Manager's AccessSecretVersionResponse in JSON.
type accessResponse struct {
	Name    string `json:"name"`
	Payload struct {
		Data []byte `json:"data"` // base64 in JSON
		// DataCrc32c is an int64, which JSON carries as a string.
		DataCrc32c *string `json:"dataCrc32c"`
	} `json:"payload"`
}

// smEndpoint is the Secret Manager endpoint for s: the class's (the
// admin's) for a global secret, and for a regional one too unless it is
// Google's public endpoint, whose regional twin is
// secretmanager.LOCATION.rep.googleapis.com.
func smEndpoint(base string, s Secret) string {
	if s.location == "" || base != DefaultSecretManagerEndpoint || !validLocation(s.location) {
		return base
	}
	return "https://secretmanager." + s.location + ".rep.googleapis.com"
}

// access reads one secret version (versions.access) with the pod's
// token, verifies its checksum and extracts a key where the class asks.
// It returns the value and the version's full name.
func (p *Provider) access(ctx context.Context, base string, s Secret, token string) (string, string, error) {
	what := "access " + s.ResourceName
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, smEndpoint(base, s)+"/v1/"+s.ResourceName+":access", nil)
	if err != nil {
		return "", "", fmt.Errorf("%w: %s: %v", provider.ErrInvalidParameters, what, err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return "", "", fmt.Errorf("%w: %s: %v", provider.ErrUnavailable, what, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes+1))
	if err != nil {
		return "", "", fmt.Errorf("%w: %s: reading the answer: %v", provider.ErrUnavailable, what, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", "", classify(resp.StatusCode, body, what)
	}
	if len(body) > maxResponseBytes {
		return "", "", fmt.Errorf("%w: %s: the value is over %d bytes", provider.ErrInvalidParameters, what, MaxValueBytes)
	}
	var ar accessResponse
	if err := json.Unmarshal(body, &ar); err != nil {
		return "", "", fmt.Errorf("%w: %s: the answer is not an AccessSecretVersionResponse", provider.ErrUnavailable, what)
	}
	if len(ar.Payload.Data) > MaxValueBytes {
		return "", "", fmt.Errorf("%w: %s: the value is over %d bytes", provider.ErrInvalidParameters, what, MaxValueBytes)
	}
	if ar.Payload.DataCrc32c != nil {
		want, err := strconv.ParseInt(*ar.Payload.DataCrc32c, 10, 64)
		if err != nil || uint32(want) != crc32.Checksum(ar.Payload.Data, castagnoli) || want>>32 != 0 {
			return "", "", fmt.Errorf("%w: %s: the value does not match its CRC32C checksum", provider.ErrUnavailable, what)
		}
	}
	v, err := extract(ar.Payload.Data, s)
	if err != nil {
		return "", "", fmt.Errorf("%w: %s: %v", provider.ErrInvalidParameters, what, err)
	}
	return v, ar.Name, nil
}

// extract is the value the class asks for: the whole payload, or one
// top-level key of a JSON or YAML document, whose value is written as it
// is if a string, as JSON otherwise. Errors never quote the value.
func extract(data []byte, s Secret) (string, error) {
	key, conv := s.ExtractJSONKey, func(b []byte) ([]byte, error) { return b, nil }
	if s.ExtractYAMLKey != "" {
		key, conv = s.ExtractYAMLKey, yaml.YAMLToJSON
	}
	if key == "" {
		return string(data), nil
	}
	doc, err := conv(data)
	var m map[string]json.RawMessage
	if err != nil || json.Unmarshal(doc, &m) != nil {
		return "", errors.New("the value is not a document of keys")
	}
	raw, ok := m[key]
	if !ok {
		return "", fmt.Errorf("the value has no key %q", key)
	}
	var str string
	if json.Unmarshal(raw, &str) == nil {
		return str, nil
	}
	return string(raw), nil
}

// versionNames maps each secret's resourceName to the full name of the
// version read for it, as Secret Manager answered (its project as a
// number): the lease's Handle["versions"], in JSON.
type versionNames map[string]string

func (v versionNames) String() string {
	b, _ := json.Marshal(map[string]string(v))
	return string(b)
}

// carryPinned copies into values the value of each of secrets that names
// a version by number and that prior (the lease a re-issue replaces; nil
// at a publish) read: the same resource, the same version as Secret
// Manager named it, under the same file. A version's payload cannot
// change, so reading it again would only cost a call per renewal. It
// returns the versions carried and the secrets left to read: aliases,
// which may have moved, and whatever prior lacks.
func carryPinned(secrets []Secret, prior *provider.Lease, values map[string]string) (versionNames, []Secret) {
	versions := versionNames{}
	var had versionNames
	var old map[string]string
	if prior != nil {
		_ = json.Unmarshal([]byte(prior.Handle["versions"]), &had) // none carried if unreadable
		old = prior.Values
	}
	var read []Secret
	for _, s := range secrets {
		name, ok := had[s.ResourceName]
		v, ok2 := old[s.file()]
		if s.alias() || !ok || !ok2 || !strings.HasSuffix(name, "/secrets/"+s.secret+"/versions/"+s.version) {
			read = append(read, s)
			continue
		}
		values[s.file()] = v
		versions[s.ResourceName] = name
	}
	return versions, read
}
